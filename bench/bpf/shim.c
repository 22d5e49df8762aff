/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * shim.c - test-run front end: give each run a new source, then tail-call
 * the program under test (slot 0). BPF_PROG_TEST_RUN repeats on the same
 * buffer, so this is how one test run sees a million sources. The shim's
 * own cost is measured by putting the trivial program behind it.
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include "srcgen.h"

BPF_ARRAY(shim_cfg, struct srcgen_cfg, 1);
BPF_PROG_ARRAY(shim_jt, 1);

int bench_shim(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	__u32 zero = 0;
	struct srcgen_cfg *cfg = shim_cfg.lookup(&zero);

	if (!cfg || (void *)(ip + 1) > end)
		return XDP_ABORTED;
	if (cfg->mode != SRC_FIXED)
		ip->saddr = bpf_htonl(srcgen_pick(cfg->mode, cfg->entries));
	shim_jt.call(ctx, 0);
	return XDP_ABORTED;
}
