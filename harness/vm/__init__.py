"""One boot: a QEMU process, its console and QMP, fault detection, deadlines, and the guest drivers.

- :mod:`~harness.vm.machine`: one QEMU process (``MachineSpec`` -> argv; launch; certain end).
- :mod:`~harness.vm.console` and :mod:`~harness.vm.qmp`: the serial console (pexpect) and QMP.
- :mod:`~harness.vm.faults`: kernel faults from console text, a table kept as data.
- :mod:`~harness.vm.patterns`: verdicts of inits without markers (root failures, kernel phases).
- :mod:`~harness.vm.deadlines`, :mod:`~harness.vm.accel`, :mod:`~harness.vm.loadscale`.
- :mod:`~harness.vm.boot`: ``Vm`` drives a boot through its phases to one outcome.
- :mod:`~harness.vm.loader`: the loader phase (GRUB, the EFI shell): prompts, GRUB's failures.
- :mod:`~harness.vm.builder` boots the guest that makes a disk layout; :mod:`~harness.vm.distro`
  assembles a real system (root, its generator's initramfs, a layout) to boot.
- Guest drivers, written against the :class:`~harness.vm.guest.Guest` protocol:
  :mod:`~harness.vm.shell`, :mod:`~harness.vm.login`, :mod:`~harness.vm.power`,
  :mod:`~harness.vm.exitcode`,
  :mod:`~harness.vm.state`, :mod:`~harness.vm.hotplug`, :mod:`~harness.vm.blockview`.

May import the foundation, :mod:`harness.kernel`, :mod:`harness.image`, :mod:`harness.storage`.
"""
