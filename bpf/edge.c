/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * edge.c - the privedge XDP program, run by the root program through
 * pe_progs_v1[PE_PROG_EDGE] on every packet of an edge interface.
 *
 * It reads like DESIGN.md section 1:
 *   1 parse   stage_parse()  (include/parse.h)   malformed -> DROP(reason)
 *   2 decap   stage_decap()  (include/steer.h)   tunnel to this DC -> inner packet
 *   3 filter  stage_filter() (include/filter.h)  deny, bogon, L4, rate
 *   4 steer   stage_steer()  (include/steer.h)   other region's IP -> tunnel, REDIRECT
 *   6 count   record()       one exit, per-CPU counters per reason
 *   7 PASS    -> kernel stack
 * Sampling (5) joins here as a further stage.
 */
#include "pe_abi.h"
#include "pe_maps.h"
#include "parse.h"
#include "gen.h"
#include "filter.h"
#include "steer.h"

/* The one exit: count packets and bytes under the reason, return its verdict. */
static __always_inline int record(__u32 reason, __u32 len)
{
	struct pe_counter *c = pe_stats_v1.lookup(&reason);

	if (c) {
		/* Per-CPU slot: XDP runs in softirq, nothing else writes it. */
		c->packets += 1;
		c->bytes += len;
	}
	if ((PE_REDIRECT_REASONS >> reason) & 1)
		return XDP_REDIRECT;    /* stage_steer() called bpf_redirect() */
	return (PE_DROP_REASONS >> reason) & 1 ? XDP_DROP : XDP_PASS;
}

static __always_inline int passes(__u32 reason)
{
	return reason == PE_R_PASS || reason == PE_R_PASS_ALLOW || reason == PE_R_PASS_FRAGMENT;
}

int pe_edge(struct xdp_md *ctx)
{
	struct pe_pkt pkt = {};
	struct pe_gen g;
	int decapped = 0;
	__u32 reason = stage_parse(ctx, &pkt);

	if (reason != PE_R_PASS)
		goto out;
	if (!gen_open(&g)) {
		reason = PE_R_PASS_NO_RULES;
		goto out;
	}
	if (tunnel_to_us(&g, &pkt)) {
		decapped = 1;
		reason = stage_decap(ctx, &g, &pkt);
		if (reason != PE_R_PASS)
			goto out;
	}
	reason = stage_filter(&g, &pkt);
	if (!passes(reason))
		goto out;
	/* A decapsulated packet is never steered again: no loops between DCs
	 * whose tables disagree for a moment; the regional guard has the rest. */
	if (decapped)
		reason = PE_R_PASS_DECAP;
	else
		reason = stage_steer(ctx, &g, &pkt, reason);
out:
	return record(reason, pkt.len);
}
