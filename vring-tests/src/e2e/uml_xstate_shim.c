/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * LD_PRELOAD shim for Debian's user-mode Linux 6.1 on hosts whose XSAVE area
 * is larger than UML knows (AVX-512, AMX).
 *
 * UML saves a guest process's FPU state with
 * ptrace(PTRACE_GETREGSET, NT_X86_XSTATE) into a fixed buffer of
 * sizeof(struct _xstate) bytes (legacy area, XSAVE header, AVX) and restores
 * it with PTRACE_SETREGSET from the same buffer. The host kernel truncates a
 * short GETREGSET, but refuses a SETREGSET whose length is not the whole
 * XSAVE size with EFAULT (arch/x86/kernel/fpu/regset.c, xstateregs_set), and
 * UML then kills the guest's init ("userspace - ptrace set fp regs failed,
 * errno = 14", a kernel panic before /init runs). Linux fixed UML later by
 * sizing the buffer from the host; 6.1 is what Debian ships.
 *
 * The shim passes every ptrace call through. When a SETREGSET of the XSAVE
 * regset fails with EFAULT, it reads the tracee's whole current state, lays
 * UML's shorter buffer over its start and writes the whole state back: the
 * components UML knows come from UML, the ones past its buffer stay what the
 * tracee has (UML never saw them, so the host keeps them, which is what a
 * 6.1 host without those components did implicitly).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif

typedef long (*ptrace_fn)(long, pid_t, void *, void *);

/* Far larger than any XSAVE area (AMX makes it about 11 KiB); the kernel
 * shortens iov_len to the real size. UML's tracer is a single host thread,
 * the spin flag only guards against surprises. */
static unsigned char whole_state[1 << 16] __attribute__((aligned(64)));
static int whole_state_busy;

long ptrace(enum __ptrace_request request, ...)
{
	static ptrace_fn real_ptrace;
	va_list ap;

	va_start(ap, request);
	pid_t pid = va_arg(ap, pid_t);
	void *addr = va_arg(ap, void *);
	void *data = va_arg(ap, void *);
	va_end(ap);

	if (!real_ptrace)
		real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
	if (!real_ptrace) {
		errno = ENOSYS;
		return -1;
	}
	long rc = real_ptrace(request, pid, addr, data);
	if (rc == 0 || request != PTRACE_SETREGSET || errno != EFAULT ||
	    (unsigned long)addr != NT_X86_XSTATE || data == NULL)
		return rc;

	const struct iovec *short_state = data;
	while (__atomic_exchange_n(&whole_state_busy, 1, __ATOMIC_ACQUIRE))
		;
	struct iovec whole = { whole_state, sizeof(whole_state) };
	rc = real_ptrace(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &whole);
	if (rc == 0 && short_state->iov_len <= whole.iov_len) {
		memcpy(whole_state, short_state->iov_base, short_state->iov_len);
		rc = real_ptrace(PTRACE_SETREGSET, pid, (void *)NT_X86_XSTATE, &whole);
	} else if (rc == 0) {
		errno = EFAULT;
		rc = -1;
	}
	__atomic_store_n(&whole_state_busy, 0, __ATOMIC_RELEASE);
	return rc;
}
