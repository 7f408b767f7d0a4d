/* Stand-in for QEMU's virtqueue_pop, for the cost of the host probe's virtqueue_pop uprobe pair.
 *
 * Exports `void *virtqueue_pop(void *vq, size_t sz)` (in .dynsym, like QEMU's) returning a static
 * element laid out like QEMU >= 4.2's VirtQueueElement, in one of three shapes: "cmd" (one 4-byte
 * out buffer holding 0x80000001), "hint" (one 4 MiB in buffer), "other" (2 out + 1 in, which the BPF
 * filter drops).  Built twice: with QEMU's kind of first instruction and with a push (see below).
 * It holds /dev/kvm open so `hintscope probe host` accepts it as a VMM.
 *
 *   vq_pop_loop          prints "READY <pid>", then per stdin line "SHAPE N" calls virtqueue_pop N
 *                        times and prints "ns_per_call=X"; EOF ends it.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    unsigned int index, len, ndescs, out_num, in_num;
    uint64_t *in_addr, *out_addr;
    struct iovec *in_sg, *out_sg;
} Elem;

static uint32_t cmd_word = 0x80000001u;
static char hint_buf[64];
static struct iovec cmd_out[1] = {{&cmd_word, 4}};
static struct iovec hint_in[1] = {{hint_buf, 4u << 20}};   /* the length only; never dereferenced */
static struct iovec other_out[2] = {{&cmd_word, 4}, {&cmd_word, 4}};
static struct iovec other_in[1] = {{hint_buf, 64}};
static Elem elems[3] = {
    {.out_num = 1, .in_num = 0, .out_sg = cmd_out},
    {.out_num = 0, .in_num = 1, .in_sg = hint_in},
    {.out_num = 2, .in_num = 1, .out_sg = other_out, .in_sg = other_in},
};
static volatile int shape;

__attribute__((noinline, used, visibility("hidden"))) void *vq_pop_impl(void *vq, size_t sz)
{
    (void)vq;
    (void)sz;
    __asm__ volatile("" ::: "memory");
    return &elems[shape];
}

/* Like QEMU's: a dispatcher that tail-jumps to the real pop.  Its first instruction decides what a
 * uprobe at the entry costs: uprobes emulate push and jmp in the kernel, while anything else, such
 * as QEMU's `movabs $0xff00ff000000,%rax`, is single-stepped out of line: a second trap.
 *   QEMU_DISPATCH: QEMU 7.2/10.0's exact instruction sequence (the probe then attaches at its tail
 *                  jumps, hintscope/probes/qemu_uprobes.py vq_pop_sites); vq->vdev is at 0x60;
 *   PUSH_FIRST:    a push first (emulated), probed at the entry;
 *   default:       QEMU's movabs first, then a jmp, probed at the entry. */
#if defined(QEMU_DISPATCH)
#define BODY "movabs $0xff00ff000000, %rax\n\t" "mov 0x60(%rdi), %rdx\n\t" "and 0x1b0(%rdx), %rax\n\t" \
             "jne 1f\n\t" "testb $0x4, 0xb4(%rdx)\n\t" "je 2f\n\t" \
             ".byte 0xe9\n\t.long vq_pop_impl - . - 4\n\t" "nopl (%rax)\n" \
             "2:\t.byte 0xe9\n\t.long vq_pop_impl - . - 4\n" "1:\txor %eax, %eax\n\tret\n\t"
#elif defined(PUSH_FIRST)
#define BODY "push %rdi\n\tpop %rdi\n\tjmp vq_pop_impl\n\t"
#else
#define BODY "movabs $0xff00ff000000, %rax\n\tjmp vq_pop_impl\n\t"
#endif
__attribute__((naked, visibility("default"))) void *virtqueue_pop(void *vq, size_t sz)
{
    __asm__(BODY);
}

static void *(*volatile pop)(void *, size_t) = virtqueue_pop;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "--version")) {
        puts("vq_pop_loop (hintscope benchmark)");
        return 0;
    }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    printf("READY %d kvm=%d\n", (int)getpid(), kvm >= 0);
    fflush(stdout);
    char name[16];
    unsigned long n;
    static void *vq[0x68 / sizeof(void *)];
    static char vdev[0x200];
    vq[0x60 / sizeof(void *)] = vdev;   /* QEMU_DISPATCH reads vq->vdev's features: all zero = split ring */
    while (scanf("%15s %lu", name, &n) == 2) {
        shape = !strcmp(name, "cmd") ? 0 : !strcmp(name, "hint") ? 1 : 2;
        uint64_t t0 = now_ns();
        for (unsigned long i = 0; i < n; i++)
            pop(vq, sizeof(Elem));
        uint64_t t1 = now_ns();
        printf("ns_per_call=%.3f\n", n ? (double)(t1 - t0) / n : 0.0);
        fflush(stdout);
    }
    return 0;
}
