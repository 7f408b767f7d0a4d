// hintscope QEMU uprobes: appended to host.bpf.c (same ring buffer, same 88-byte records).
// Each function is attached by hintscope/probes/qemu_uprobes.py to a dynamic symbol of the
// target's QEMU binary; a symbol the build lacks is reported in meta, not attached.
//
// Event ids (hdr.aux) must match qemu_uprobes.EVENTS.

#define QEV_HINT_APPLY      1
#define QEV_HINT_APPLY_RET  2
#define QEV_SYNC_BEGIN      3
#define QEV_SYNC_END        4
#define QEV_MIGRATE_STATE   5
#define QEV_NOTIFY_CONFIG   6
#define QEV_PRECOPY_NOTIFY  7
#define QEV_PAGE_SEND       8

#ifndef PAGE_SEND_LEN
#define PAGE_SEND_LEN 4096
#endif

static __always_inline int qemu_emit(u16 ev, u64 a0, u64 a1, u64 a2, s64 ret)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TARGET_TGID)
        return 0;
    struct rec_qemu *r = events.ringbuf_reserve(sizeof(struct rec_qemu));
    if (!r) {
        count_lost(LOST_QEMU);
        return 0;
    }
    __builtin_memset(r, 0, sizeof(*r));
    r->h.type = REC_QEMU;
    r->h.aux = ev;
    r->h.tid = (u32)id;
    r->h.ts = bpf_ktime_get_ns();
    r->a0 = a0;
    r->a1 = a1;
    r->a2 = a2;
    r->ret = ret;
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    return 0;
}

// void qemu_guest_free_page_hint(void *addr, size_t len): addr is a host virtual address.
int q_hint_apply(struct pt_regs *ctx)
{
    return qemu_emit(QEV_HINT_APPLY, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, 0);
}

int q_hint_apply_ret(struct pt_regs *ctx)
{
    return qemu_emit(QEV_HINT_APPLY_RET, 0, 0, 0, 0);
}

// void memory_global_dirty_log_sync(void) in 7.2 (later: bool last_stage, not recorded: 7.2 has no
// argument, so the register would be garbage there).
int q_sync_begin(struct pt_regs *ctx)
{
    return qemu_emit(QEV_SYNC_BEGIN, 0, 0, 0, 0);
}

int q_sync_end(struct pt_regs *ctx)
{
    return qemu_emit(QEV_SYNC_END, 0, 0, 0, 0);
}

// void migrate_set_state(int *state, int old_state, int new_state)
int q_migrate_state(struct pt_regs *ctx)
{
    return qemu_emit(QEV_MIGRATE_STATE, PT_REGS_PARM1(ctx), (u32)PT_REGS_PARM2(ctx), (u32)PT_REGS_PARM3(ctx), 0);
}

// void virtio_notify_config(VirtIODevice *vdev)
int q_notify_config(struct pt_regs *ctx)
{
    return qemu_emit(QEV_NOTIFY_CONFIG, PT_REGS_PARM1(ctx), 0, 0, 0);
}

// int notifier_with_return_list_notify(NotifierWithReturnList *list, void *data[, Error **errp]):
// for the precopy notifiers data points to a PrecopyNotifyData whose first member is the reason.
int q_notifier(struct pt_regs *ctx)
{
    u64 data = PT_REGS_PARM2(ctx);
    s32 reason = -1;
    if (data)
        bpf_probe_read_user(&reason, sizeof(reason), (void *)data);
    return qemu_emit(QEV_PRECOPY_NOTIFY, PT_REGS_PARM1(ctx), (u64)(s64)reason, data, 0);
}

// bool buffer_is_zero(const void *buf, size_t len): the RAM save path calls it once per page.
int q_page_send(struct pt_regs *ctx)
{
    if (PT_REGS_PARM2(ctx) != PAGE_SEND_LEN)
        return 0;
    return qemu_emit(QEV_PAGE_SEND, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 0, 0);
}

// virtqueue_pop(VirtQueue *vq, size_t sz) -> VirtQueueElement *: the vq is only known at entry,
// the element only at return, so the entry saves vq per thread for the uretprobe.  Only the two
// element shapes the free page vq carries are emitted (virtqueue_pop also serves every other
// virtio device; filtering here keeps their elements out of the ring).  Field offsets come from
// qemu_uprobes.element_layout() as -D flags.
#define QEV_VQ_POP_CMD      9
#define QEV_VQ_POP_HINT     10

#ifndef VQE_OUT_NUM
#define VQE_OUT_NUM 12
#define VQE_IN_NUM  16
#define VQE_IN_SG   40
#define VQE_OUT_SG  48
#endif

struct vq_iovec {
    u64 base;
    u64 len;
};

BPF_HASH(vq_pop_vq, u32, u64, 4096);

int q_vq_pop(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TARGET_TGID)
        return 0;
    u32 tid = (u32)id;
    u64 vq = PT_REGS_PARM1(ctx);
    vq_pop_vq.update(&tid, &vq);
    return 0;
}

int q_vq_pop_ret(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TARGET_TGID)
        return 0;
    u32 tid = (u32)id;
    u64 *vqp = vq_pop_vq.lookup(&tid);
    if (!vqp)
        return 0;   // entry not seen (probe attached mid-call)
    u64 vq = *vqp;
    vq_pop_vq.delete(&tid);
    u64 elem = PT_REGS_RC(ctx);
    if (!elem)
        return 0;   // queue empty
    u32 out_num = 0, in_num = 0;
    if (bpf_probe_read_user(&out_num, sizeof(out_num), (void *)(elem + VQE_OUT_NUM)) ||
        bpf_probe_read_user(&in_num, sizeof(in_num), (void *)(elem + VQE_IN_NUM)))
        return 0;
    struct vq_iovec iov = {};
    u64 sg = 0;
    if (out_num == 1 && in_num == 0) {
        if (bpf_probe_read_user(&sg, sizeof(sg), (void *)(elem + VQE_OUT_SG)) ||
            bpf_probe_read_user(&iov, sizeof(iov), (void *)sg) || iov.len != 4)
            return 0;
        u32 cmd = 0;
        // The guest just wrote the buffer, so it is resident; -EFAULT is recorded, not dropped.
        s64 err = bpf_probe_read_user(&cmd, sizeof(cmd), (void *)iov.base) ? -14 : 0;
        return qemu_emit(QEV_VQ_POP_CMD, vq, cmd, 0, err);
    }
    if (in_num == 1 && out_num == 0) {
        if (bpf_probe_read_user(&sg, sizeof(sg), (void *)(elem + VQE_IN_SG)) ||
            bpf_probe_read_user(&iov, sizeof(iov), (void *)sg))
            return 0;
        return qemu_emit(QEV_VQ_POP_HINT, vq, iov.base, iov.len, 0);
    }
    return 0;
}
