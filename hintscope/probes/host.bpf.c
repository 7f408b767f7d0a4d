// hintscope host probe: KVM dirty-log ioctls and dirty-ring tracepoints of one VMM process.
//
// Compiled by BCC with -DTARGET_TGID=<pid> -DRB_PAGES=<n> (and optionally -DPAGE_SEND_LEN=4096 for
// the QEMU uprobes that are appended from qemu_uprobes.bpf.c).  Only tracepoints and uprobes: this
// host has no kprobes.  Argument layouts: protocol.md section 3 and hintscope/probes/kvm_abi.py.
//
// Every record has the same size (struct rec, 88 bytes + the ring's 8-byte header), so the
// Python consumer can view the ring buffer as a numpy array with a 96-byte stride and decode
// all records of a poll at once (hintscope/probes/decode.py keeps the same layout).

#include <uapi/linux/ptrace.h>

#define REC_IOCTL      1
#define REC_BITMAP     2
#define REC_RING_PUSH  3
#define REC_RING_RESET 4
#define REC_QEMU       5

#define LOST_IOCTL  0
#define LOST_BITMAP 1
#define LOST_RING   2
#define LOST_QEMU   3
#define LOST_INFLIGHT 4   // sys_exit without a matching sys_enter (probe attached mid-ioctl, map full)
#define SLOT_UNKNOWN 5    // GET_DIRTY_LOG on a slot whose size we never saw

#define CMD_GET_DIRTY_LOG   0x4010AE42u
#define CMD_CLEAR_DIRTY_LOG 0xC018AEC0u
#define CMD_SET_REGION      0x4020AE46u
#define CMD_SET_REGION2     0x40A0AE49u
#define CMD_RESET_RINGS     0x0000AEC7u
#define CMD_ENABLE_CAP      0x4068AEA3u

#define WORDS_PER_REC 8
// BCC 0.26 cannot load bpf_loop callbacks (no BPF_PSEUDO_FUNC relocation), so a bitmap is walked
// by a bounded loop of CHUNKS_PER_CALL chunks that tail-calls itself (at most 33 calls):
// 33 * CHUNKS_PER_CALL * 8 words * 64 pages = the largest slot read in full (see MAX_SLOT_PAGES
// in host.py); bigger bitmaps are truncated and counted in lost[BITMAP_TRUNC].
#ifndef CHUNKS_PER_CALL
#define CHUNKS_PER_CALL 256
#endif
#define MAX_TAIL_CALLS 32

struct hdr {
    u16 type;
    u16 aux;      // ioctl: flags (1 = bitmap truncated); bitmap: op (1 get, 2 clear) | nwords << 8; qemu: event id
    u32 tid;      // bitmap: the ioctl seq instead
    u64 ts;
};

struct rec_ioctl {
    struct hdr h;
    u64 enter_ns;
    u32 seq;
    u32 cmd;
    s32 fd;
    s32 slot;
    s64 ret;
    u64 a0, a1, a2, a3;   // per-cmd arguments, see decode.py
    u64 pad;
};

struct rec_bitmap {
    struct hdr h;
    s32 slot;
    u32 base_word;
    u64 mask[WORDS_PER_REC];
};

struct rec_ring {
    struct hdr h;
    s32 vcpu;
    u32 dirty_index;
    u32 reset_index;
    u32 slot;
    u64 offset;
    u64 pad[6];
};

struct rec_qemu {
    struct hdr h;
    u64 a0, a1, a2;
    s64 ret;
    u64 pad[5];
};

// The ioctl arguments we keep between sys_enter and sys_exit of one thread.
struct inflight {
    u64 enter_ns;
    u64 arg;
    u32 cmd;
    s32 fd;
    u64 w[4];     // first 32 bytes of the argument struct, read at entry
};

// A bitmap walk in progress (keyed by thread: syscall tracepoints may be preempted here).
struct bitmap_job {
    struct rec_ioctl io;  // the ioctl record, emitted when the walk ends (a2 = pages found)
    u64 ptr;
    u32 nwords;
    u32 next_chunk;
    u32 last_bits;        // valid bits of the last word (0 = all 64)
    u32 calls;
    u16 op;
};

_Static_assert(sizeof(struct rec_ioctl) == 88, "record size");
_Static_assert(sizeof(struct rec_bitmap) == 88, "record size");
_Static_assert(sizeof(struct rec_ring) == 88, "record size");
_Static_assert(sizeof(struct rec_qemu) == 88, "record size");

#define LOST_BITMAP_TRUNC 6

BPF_RINGBUF_OUTPUT(events, RB_PAGES);
BPF_HASH(inflight, u32, struct inflight, 4096);
BPF_HASH(jobs, u32, struct bitmap_job, 1024);
BPF_HASH(slot_pages, u64, u64, 4096);          // (fd << 32 | slot) -> pages in the slot
BPF_PERCPU_ARRAY(lost, u64, 8);
BPF_ARRAY(seqno, u64, 1);
BPF_PROG_ARRAY(tail, 1);

static __always_inline void count_lost(int idx)
{
    u64 *v = lost.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline int is_target(void)
{
    return (bpf_get_current_pid_tgid() >> 32) == TARGET_TGID;
}

static __always_inline void emit_ioctl(struct rec_ioctl *io)
{
    struct rec_ioctl *r = events.ringbuf_reserve(sizeof(struct rec_ioctl));
    if (!r) {
        count_lost(LOST_IOCTL);
        return;
    }
    __builtin_memcpy(r, io, sizeof(*r));
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

// One chunk of 8 words: returns 1 when the walk is over.
static __always_inline int bitmap_chunk(struct bitmap_job *j, u32 i)
{
    u64 w[WORDS_PER_REC] = {};
    u32 base = i * WORDS_PER_REC;
    if (base >= j->nwords)
        return 1;
    u32 n = j->nwords - base;
    if (n > WORDS_PER_REC)
        n = WORDS_PER_REC;
    u32 sz = n * 8;
    // Hide sz's provenance from clang so the verifier sees the mask and the bounds check.
    asm volatile("" : "+r"(sz));
    sz &= 0x7f;
    if (sz == 0 || sz > sizeof(w))
        return 1;
    if (bpf_probe_read_user(w, sz, (void *)(j->ptr + (u64)base * 8)) != 0) {
        count_lost(LOST_BITMAP);
        return 0;
    }
    if (j->last_bits && base + n == j->nwords) {
        // Bits past num_pages in CLEAR's last word are ignored by KVM: do not report them.
        u64 keep = (1ULL << (j->last_bits & 63)) - 1;
        u32 k = (n - 1) & (WORDS_PER_REC - 1);
        w[k] &= keep;
    }
    u64 any = 0;
    u64 cnt = 0;
#pragma unroll
    for (int k = 0; k < WORDS_PER_REC; k++) {
        any |= w[k];
        cnt += __builtin_popcountll(w[k]);
    }
    if (!any)
        return 0;
    j->io.a2 += cnt;
    struct rec_bitmap *r = events.ringbuf_reserve(sizeof(struct rec_bitmap));
    if (!r) {
        count_lost(LOST_BITMAP);
        return 0;
    }
    r->h.type = REC_BITMAP;
    r->h.aux = j->op | (n << 8);
    r->h.tid = j->io.seq;
    r->h.ts = j->io.h.ts;
    r->slot = j->io.slot;
    r->base_word = base;
#pragma unroll
    for (int k = 0; k < WORDS_PER_REC; k++)
        r->mask[k] = w[k];
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    return 0;
}

// Tail-call target: walks CHUNKS_PER_CALL chunks of the calling thread's job, then either calls
// itself again or emits the ioctl record.
int bitmap_walk(void *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct bitmap_job *j = jobs.lookup(&tid);
    if (!j)
        return 0;
    u32 start = j->next_chunk;
    int done = 0;
    for (u32 i = 0; i < CHUNKS_PER_CALL; i++) {
        if (bitmap_chunk(j, start + i)) {
            done = 1;
            break;
        }
    }
    j->next_chunk = start + CHUNKS_PER_CALL;
    if (!done && j->calls < MAX_TAIL_CALLS) {
        j->calls++;
        tail.call(ctx, 0);
    }
    if (!done) {
        j->io.h.aux |= 1;
        count_lost(LOST_BITMAP_TRUNC);
    }
    emit_ioctl(&j->io);
    jobs.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
    if (!is_target())
        return 0;
    u32 cmd = (u32)args->cmd;
    u32 sz;
    switch (cmd) {
    case CMD_GET_DIRTY_LOG: sz = 16; break;
    case CMD_CLEAR_DIRTY_LOG: sz = 24; break;
    case CMD_SET_REGION:
    case CMD_SET_REGION2: sz = 32; break;
    case CMD_ENABLE_CAP: sz = 16; break;
    case CMD_RESET_RINGS: sz = 0; break;
    default: return 0;
    }
    struct inflight f = {};
    f.enter_ns = bpf_ktime_get_ns();
    f.arg = (u64)args->arg;
    f.cmd = cmd;
    f.fd = (s32)args->fd;
    if (sz == 16)
        bpf_probe_read_user(f.w, 16, (void *)f.arg);
    else if (sz == 24)
        bpf_probe_read_user(f.w, 24, (void *)f.arg);
    else if (sz == 32)
        bpf_probe_read_user(f.w, 32, (void *)f.arg);
    u32 tid = (u32)bpf_get_current_pid_tgid();
    inflight.update(&tid, &f);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
    if (!is_target())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight *fp = inflight.lookup(&tid);
    if (!fp)
        return 0;
    struct inflight f = *fp;
    inflight.delete(&tid);

    struct bitmap_job j = {};
    struct rec_ioctl *io = &j.io;
    s64 ret = args->ret;
    int zero = 0;
    u64 *sp = seqno.lookup(&zero);
    io->h.type = REC_IOCTL;
    io->h.tid = tid;
    io->h.ts = bpf_ktime_get_ns();
    io->enter_ns = f.enter_ns;
    io->seq = sp ? (u32)__sync_fetch_and_add(sp, 1) : 0;
    io->cmd = f.cmd;
    io->fd = f.fd;
    io->slot = -1;
    io->ret = ret;

    switch (f.cmd) {
    case CMD_SET_REGION:
    case CMD_SET_REGION2: {
        io->slot = (s32)(u32)f.w[0];
        io->a0 = f.w[0] >> 32;          // flags
        io->a1 = f.w[1];                // guest_phys_addr
        io->a2 = f.w[2];                // memory_size
        io->a3 = f.w[3];                // userspace_addr
        if (ret == 0) {
            u64 key = ((u64)(u32)f.fd << 32) | (u32)f.w[0];
            u64 pages = f.w[2] >> 12;
            if (pages)
                slot_pages.update(&key, &pages);
            else
                slot_pages.delete(&key);
        }
        break;
    }
    case CMD_GET_DIRTY_LOG: {
        io->slot = (s32)(u32)f.w[0];
        io->a0 = f.w[1];                // bitmap pointer
        io->a2 = (u64)-1;               // pages harvested: unknown
        io->a3 = (u64)-1;               // slot size in pages: unknown
        u64 key = ((u64)(u32)f.fd << 32) | (u32)f.w[0];
        u64 *np = slot_pages.lookup(&key);
        if (!np) {
            count_lost(SLOT_UNKNOWN);
            break;
        }
        io->a3 = *np;
        if (ret != 0)
            break;
        io->a2 = 0;
        j.ptr = f.w[1];
        j.nwords = (u32)((*np + 63) / 64);
        j.op = 1;
        jobs.update(&tid, &j);
        tail.call(args, 0);
        jobs.delete(&tid);
        io->a2 = (u64)-1;
        count_lost(LOST_BITMAP);
        break;
    }
    case CMD_CLEAR_DIRTY_LOG: {
        io->slot = (s32)(u32)f.w[0];
        io->a0 = f.w[1];                // first_page
        io->a1 = f.w[0] >> 32;          // num_pages
        io->a3 = f.w[2];                // bitmap pointer
        io->a2 = (u64)-1;
        if (ret != 0)
            break;
        io->a2 = 0;
        j.ptr = f.w[2];
        j.nwords = (u32)((io->a1 + 63) / 64);
        j.last_bits = (u32)(io->a1 & 63);
        j.op = 2;
        jobs.update(&tid, &j);
        tail.call(args, 0);
        jobs.delete(&tid);
        io->a2 = (u64)-1;
        count_lost(LOST_BITMAP);
        break;
    }
    case CMD_ENABLE_CAP:
        io->a0 = (u32)f.w[0];           // cap
        io->a1 = f.w[1];                // args[0]
        io->a2 = f.w[0] >> 32;          // flags
        break;
    case CMD_RESET_RINGS:
        io->a2 = ret >= 0 ? (u64)ret : (u64)-1;
        break;
    }
    emit_ioctl(io);
    return 0;
}

// Reserve a dirty-ring record with its header filled (both ring tracepoints); NULL when the ring
// buffer is full, counted as lost.
static __always_inline struct rec_ring *ring_rec(u16 type)
{
    struct rec_ring *r = events.ringbuf_reserve(sizeof(struct rec_ioctl));
    if (!r) {
        count_lost(LOST_RING);
        return 0;
    }
    __builtin_memset(r, 0, sizeof(*r));
    r->h.type = type;
    r->h.tid = (u32)bpf_get_current_pid_tgid();
    r->h.ts = bpf_ktime_get_ns();
    return r;
}

TRACEPOINT_PROBE(kvm, kvm_dirty_ring_push)
{
    if (!is_target())
        return 0;
    struct rec_ring *r = ring_rec(REC_RING_PUSH);
    if (!r)
        return 0;
    r->vcpu = args->index;
    r->dirty_index = args->dirty_index;
    r->reset_index = args->reset_index;
    r->slot = args->slot;
    r->offset = args->offset;
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    return 0;
}

TRACEPOINT_PROBE(kvm, kvm_dirty_ring_reset)
{
    if (!is_target())
        return 0;
    struct rec_ring *r = ring_rec(REC_RING_RESET);
    if (!r)
        return 0;
    r->vcpu = args->index;
    r->dirty_index = args->dirty_index;
    r->reset_index = args->reset_index;
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    return 0;
}
