/*
 * Drive the kernel's own vfio_mig_get_next_state() the way VFIO migration drivers do.
 *
 * tests/core/test_fsm_kernel.py extracts the function (with its two static tables) from
 * drivers/vfio/vfio_main.c into vfio_next_state.c and compiles this file with
 *
 *   -DVFIO_UAPI_H='"<kernel source>/include/uapi/linux/vfio.h"'  -I <dir of vfio_next_state.c>
 *
 * so the enum and the flag values come from the same kernel as the function, not from the
 * system's older uAPI header. The shims below are the few kernel definitions it needs.
 *
 * Every `while` in the extracted function counts its iterations: past SPIN_CAP the loop is
 * cut short and the request is reported as HANG (an unfixed kernel spins there forever on
 * the ERROR sentinel, holding the driver's state mutex). The drivers' own loop
 * (`while (cur != new)`) is capped at STEP_CAP steps and reported the same way.
 *
 * Output, one line per (flags, cur, new), flags in {1, 3, 5, 7}, cur in 0..7, new in 0..8:
 *
 *   <flags> <cur> <new> <OK|EINVAL|E<n>|HANG> <warnings> [<state> ...]
 *
 * where the trailing states are the steps taken, in order (before a refusal or a hang too).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>

/* The uAPI header as it sits in the source tree, before headers_install strips __user. */
#define __user
#include VFIO_UAPI_H

#ifndef VFIO_MIGRATION_PRE_COPY
#error "VFIO_UAPI_H is not a uAPI header with VFIO_MIGRATION_PRE_COPY (Linux >= 6.2)"
#endif

typedef uint8_t u8;

struct vfio_device {
	uint32_t migration_flags;
};

static int warnings;
#define WARN_ON(condition) ({ int __c = !!(condition); warnings += __c; __c; })
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define EXPORT_SYMBOL_GPL(symbol)

enum { SPIN_CAP = 64, STEP_CAP = 16 };

static int spins;
static int hung;

static int spin_allowed(void)
{
	if (++spins <= SPIN_CAP)
		return 1;
	hung = 1;
	return 0;
}

#define while(condition) while (spin_allowed() && (condition))
#include "vfio_next_state.c"
#undef while

static void drive(uint32_t flags, enum vfio_device_mig_state cur,
		  enum vfio_device_mig_state new)
{
	struct vfio_device device = { .migration_flags = flags };
	enum vfio_device_mig_state state = cur, next;
	enum vfio_device_mig_state steps[STEP_CAP];
	int nsteps = 0, ret = 0;
	const char *result = "OK";
	char other[16];

	warnings = 0;
	hung = 0;
	while (state != new) {
		if (nsteps == STEP_CAP) {
			hung = 1;
			break;
		}
		spins = 0;
		ret = vfio_mig_get_next_state(&device, state, new, &next);
		if (hung || ret)
			break;
		steps[nsteps++] = next;
		state = next;
	}
	if (hung) {
		result = "HANG";
	} else if (ret == -EINVAL) {
		result = "EINVAL";
	} else if (ret) {
		snprintf(other, sizeof(other), "E%d", -ret);
		result = other;
	}
	printf("%u %d %d %s %d", flags, (int)cur, (int)new, result, warnings);
	for (int i = 0; i < nsteps; i++)
		printf(" %d", (int)steps[i]);
	printf("\n");
}

int main(void)
{
	static const uint32_t flag_sets[] = {
		VFIO_MIGRATION_STOP_COPY,
		VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
		VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
		VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY,
	};

	for (unsigned int f = 0; f < ARRAY_SIZE(flag_sets); f++)
		for (int cur = VFIO_DEVICE_STATE_ERROR; cur <= VFIO_DEVICE_STATE_PRE_COPY_P2P; cur++)
			for (int new = VFIO_DEVICE_STATE_ERROR; new <= VFIO_DEVICE_STATE_NR; new++)
				drive(flag_sets[f], (enum vfio_device_mig_state)cur,
				      (enum vfio_device_mig_state)new);
	return 0;
}
