/* Answer CPUID as an AMD EPYC would, on an Intel CPU: every software check of the vendor, family and features
 * (MKL's, torch's cpuinfo, fbgemm's) then takes its AMD path, while the hardware stays Intel's.
 *
 * Why: to tell a software dispatch difference from a hardware one. With it (an AMD Zen 3, AVX2 only: the machine
 * of Foursquare's teachers), torch ran at AVX2, MKL at its generic branch with its Zen check true and its vector
 * maths at branch 0, and the Foursquare autoencoders got the digests of `python -m hetcomp.mkl_as_amd` without its
 * branch setting (5578683dbb22, f91a075a6225), not the AMD machine's: what remains differs in the hardware
 * (RSQRTPS: experiments/plans/rsqrt_table.py).
 *
 * How: the kernel's CPUID faulting (arch_prctl ARCH_SET_CPUID, where /proc/cpuinfo lists cpuid_fault) makes each
 * CPUID instruction trap; the SIGSEGV handler runs the real one and edits its answer.
 *   cc -O2 -shared -fPIC -o /tmp/cpuid_as_amd.so experiments/plans/cpuid_as_amd.c
 *   LD_PRELOAD=/tmp/cpuid_as_amd.so hetcomp train-teachers ...        (HETCOMP_FAKE_ZEN=4: a Zen 4 with AVX-512)
 * The vendor is AuthenticAMD, the family 19h, CPUID leaf 4 (Intel's caches) empty, and for Zen 3 the AVX-512 and
 * AMX feature bits cleared. An experiment, not part of the package.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <ucontext.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <cpuid.h>
#define ARCH_SET_CPUID 0x1012

static struct sigaction previous;
static int zen = 3;

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}

static void as_amd(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    switch (leaf) {
    case 0: r[1] = 0x68747541; r[3] = 0x69746e65; r[2] = 0x444d4163; break;
    case 1: r[0] = zen == 4 ? 0x00A10F11 : 0x00A00F11; break;
    case 4: r[0] = r[1] = r[2] = r[3] = 0; break;
    case 7:
        if (zen == 3 && sub == 0) {
            r[1] &= ~((1u<<16)|(1u<<17)|(1u<<21)|(1u<<26)|(1u<<27)|(1u<<28)|(1u<<30)|(1u<<31));
            r[2] &= ~((1u<<1)|(1u<<6)|(1u<<11)|(1u<<12)|(1u<<14));
            r[3] &= ~((1u<<2)|(1u<<3)|(1u<<8)|(1u<<22)|(1u<<23)|(1u<<24)|(1u<<25));
        } else if (sub == 1) {
            r[0] &= ~((1u<<4)|(zen == 3 ? (1u<<5) : 0));
        } else if (zen == 4 && sub == 0) {
            r[3] &= ~((1u<<22)|(1u<<23)|(1u<<24)|(1u<<25));  /* no AMX, no AVX512-FP16 on Zen 4 */
        }
        break;
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *g = uc->uc_mcontext.gregs;
    unsigned char *ip = (unsigned char *)g[REG_RIP];
    if (ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t r[4], leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX];
        real_cpuid(leaf, sub, r);
        as_amd(leaf, sub, r);
        g[REG_RAX] = r[0]; g[REG_RBX] = r[1]; g[REG_RCX] = r[2]; g[REG_RDX] = r[3];
        g[REG_RIP] += 2;
        return;
    }
    sigaction(SIGSEGV, &previous, NULL);
}

__attribute__((constructor)) static void start(void) {
    const char *which = getenv("HETCOMP_FAKE_ZEN");
    if (which && which[0] == '4') zen = 4;
    struct sigaction action = {0};
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}
