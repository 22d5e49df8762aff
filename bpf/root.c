/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * root.c - the program attached to the interface, once, for good.
 *
 * It only tail-calls the edge program in pe_progs_v1, so an upgrade is one
 * update of that slot and traffic never sees a moment without a program.
 * An empty slot passes traffic and counts it (PE_R_PASS_NO_PROGRAM): the
 * agent fills the slot before it attaches, so that count stays zero.
 */
#include "pe_abi.h"
#include "pe_maps.h"

int pe_root(struct xdp_md *ctx)
{
	__u32 reason = PE_R_PASS_NO_PROGRAM;
	struct pe_counter *c;

	pe_progs_v1.call(ctx, PE_PROG_EDGE);

	c = pe_stats_v1.lookup(&reason);
	if (c) {
		c->packets += 1;
		c->bytes += ctx->data_end - ctx->data;
	}
	return XDP_PASS;
}
