"""Files shipped inside the package: the init templates and the default ``kernels.toml``.

Both are links to the repository's top-level ``initrd_templates/`` and ``kernels.toml``, so a
checkout edits one copy, and a wheel (which stores the files themselves) can boot from any
folder without a catalogue of its own.
"""
