/* Synthetic KVM ioctl source for the capture benchmark: one VM, KVM_RESET_DIRTY_RINGS in a loop.
 *
 * The VM has no dirty ring, so KVM returns -EINVAL at once: the cost per call is the syscall plus
 * whatever the tracers attached to sys_enter/sys_exit_ioctl add.  The host probe records every
 * RESET_DIRTY_RINGS it sees, so the number of calls here is the ground truth for "events".
 *
 *   ioctl_loop SECONDS RATE GOFILE     (RATE calls/s, 0 = as fast as it goes)
 * prints "READY <pid>", waits for GOFILE to exist, runs, prints "DONE calls=N seconds=S".
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef KVM_RESET_DIRTY_RINGS
#define KVM_RESET_DIRTY_RINGS _IO(KVMIO, 0xc7)
#endif

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s SECONDS RATE GOFILE\n", argv[0]);
        return 2;
    }
    double secs = atof(argv[1]);
    double rate = atof(argv[2]);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) { perror("/dev/kvm"); return 1; }
    printf("READY %d\n", getpid());
    fflush(stdout);
    struct stat st;
    double wait_end = now() + 120;
    while (stat(argv[3], &st) != 0) {
        if (now() > wait_end) { fprintf(stderr, "no go file\n"); return 1; }
        usleep(2000);
    }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) { perror("KVM_CREATE_VM"); return 1; }
    long calls = 0;
    double t0 = now(), end = t0 + secs, t = t0;
    while (t < end) {
        /* batches of 64 calls between clock reads; pacing by sleeping until the schedule catches up */
        for (int i = 0; i < 64; i++)
            ioctl(vm, KVM_RESET_DIRTY_RINGS, 0);
        calls += 64;
        t = now();
        if (rate > 0) {
            double due = t0 + calls / rate;
            if (due > t) {
                usleep((useconds_t)((due - t) * 1e6));
                t = now();
            }
        }
    }
    printf("DONE calls=%ld seconds=%.6f\n", calls, t - t0);
    fflush(stdout);
    close(vm);
    close(kvm);
    return 0;
}
