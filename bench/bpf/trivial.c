/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* trivial.c - the baselines: the cheapest possible drop, pass and transmit. */
int bench_drop(struct xdp_md *ctx)
{
	return XDP_DROP;
}

int bench_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

int bench_tx(struct xdp_md *ctx)
{
	return XDP_TX;
}
