/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * ethshim.c - live-frames test-run front end for forwarding programs.
 *
 * With BPF_F_TEST_XDP_LIVE_FRAMES the kernel reuses each page's frame
 * without copying it afresh, and an encapsulating program writes its outer
 * header over the old Ethernet header. This puts that header back (its
 * bytes come from shim_eth), then tail-calls the program under test in
 * slot 0, so every repetition sees the frame as first sent. Baselines run
 * behind the same shim.
 */
#include <uapi/linux/if_ether.h>

struct ethshim_hdr {
	__u8 bytes[ETH_HLEN];
	__u8 _pad[2];
};

BPF_ARRAY(shim_eth, struct ethshim_hdr, 1);
BPF_PROG_ARRAY(shim_jt, 1);

int bench_ethshim(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct ethshim_hdr *h = shim_eth.lookup(&zero);

	if (!h || data + ETH_HLEN > end)
		return XDP_ABORTED;
	__builtin_memcpy(data, h->bytes, ETH_HLEN);
	shim_jt.call(ctx, 0);
	return XDP_ABORTED;
}
