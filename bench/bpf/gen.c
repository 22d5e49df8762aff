/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * gen.c - traffic generator: run with BPF_PROG_TEST_RUN and live frames, it
 * writes a source into each frame (srcgen.h), fixes the IPv4 header
 * checksum, and redirects the frame out of a veth to the device under test.
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include "srcgen.h"

BPF_ARRAY(gen_cfg, struct srcgen_cfg, 1);

static __always_inline __u16 ip_csum(struct iphdr *ip)
{
	__u32 sum = 0;
	__u16 *p = (__u16 *)ip;

	ip->check = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += p[i];
	sum = (sum & 0xFFFF) + (sum >> 16);
	sum = (sum & 0xFFFF) + (sum >> 16);
	return ~sum;
}

int bench_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	__u32 zero = 0;
	struct srcgen_cfg *cfg = gen_cfg.lookup(&zero);

	if (!cfg || (void *)(ip + 1) > end)
		return XDP_ABORTED;
	if (cfg->mode != SRC_FIXED) {
		ip->saddr = bpf_htonl(srcgen_pick(cfg->mode, cfg->entries));
		ip->check = ip_csum(ip);
	}
	return bpf_redirect(cfg->ifindex, 0);
}
