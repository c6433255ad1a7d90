// Test module: provoke one kind of kernel fault at load time (bootharness console logs).
#include <linux/module.h>
#include <linux/delay.h>
#include <linux/preempt.h>
#include <linux/string.h>

static char *action = "warn";
module_param(action, charp, 0444);

static int __init faultmod_init(void)
{
	pr_info("faultmod: action=%s\n", action);
	if (!strcmp(action, "warn")) {
		WARN(1, "faultmod: deliberate warning\n");
	} else if (!strcmp(action, "null")) {
		*(volatile int *)NULL = 1;
	} else if (!strcmp(action, "bug")) {
		BUG();
	} else if (!strcmp(action, "gpf")) {
		*(volatile int *)0xdead000000000000UL = 1;
	} else if (!strcmp(action, "spin")) {
		unsigned int i;
		preempt_disable();
		for (i = 0; i < 8000; i++)
			mdelay(1);
		preempt_enable();
	} else if (!strcmp(action, "sleep")) {
		msleep(5000);
	}
	pr_info("faultmod: done\n");
	return 0;
}

static void __exit faultmod_exit(void) {}

module_init(faultmod_init);
module_exit(faultmod_exit);
MODULE_LICENSE("GPL");
