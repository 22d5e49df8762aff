/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * gen.h - the rule generation a packet is judged by.
 *
 * Included by bpf/edge.c after pe_maps.h. The live slot is read once per
 * packet, and every stage gets the same struct pe_gen, so a packet never
 * mixes the maps of two generations (agent/generation.py swaps them).
 */
#ifndef PE_GEN_H
#define PE_GEN_H

#include "pe_abi.h"

struct pe_gen {
	__u32 slot;
	struct pe_params *params;
	struct pe_steer *steer;         /* NULL: no steering in this generation */
};

/* 1 when a generation is installed; fills *g. */
static __always_inline int gen_open(struct pe_gen *g)
{
	__u32 zero = 0;
	struct pe_active *act = pe_active_v1.lookup(&zero);
	void *pm, *sm;

	if (!act)
		return 0;
	g->slot = act->slot;
	g->params = NULL;
	g->steer = NULL;
	pm = pe_params_v1.lookup(&g->slot);
	if (pm)
		g->params = bpf_map_lookup_elem(pm, &zero);
	sm = pe_steer_v1.lookup(&g->slot);
	if (sm)
		g->steer = bpf_map_lookup_elem(sm, &zero);
	return g->params != NULL;
}

#endif /* PE_GEN_H */
