/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * edge.c - the privedge XDP program, run by the root program through
 * pe_progs_v1[PE_PROG_EDGE] on every packet of an edge interface.
 *
 * It reads like DESIGN.md section 1:
 *   1 parse   stage_parse()  (include/parse.h)   malformed -> DROP(reason)
 *   3 filter  stage_filter() (include/filter.h)  deny, bogon, L4, rate
 *   6 count   record()       one exit, per-CPU counters per reason
 *   7 PASS    -> kernel stack
 * Steering (2, 4) and sampling (5) join here as further stages.
 */
#include "pe_abi.h"
#include "pe_maps.h"
#include "parse.h"
#include "filter.h"

/* The one exit: count packets and bytes under the reason, return its verdict. */
static __always_inline int record(__u32 reason, __u32 len)
{
	struct pe_counter *c = pe_stats_v1.lookup(&reason);

	if (c) {
		/* Per-CPU slot: XDP runs in softirq, nothing else writes it. */
		c->packets += 1;
		c->bytes += len;
	}
	return (PE_DROP_REASONS >> reason) & 1 ? XDP_DROP : XDP_PASS;
}

int pe_edge(struct xdp_md *ctx)
{
	struct pe_pkt pkt = {};
	__u32 reason = stage_parse(ctx, &pkt);

	if (reason != PE_R_PASS)
		goto out;
	reason = stage_filter(&pkt);
out:
	return record(reason, pkt.len);
}
