"""The Gluon forward's kernel kinds by the short names the sm_90 compile checks use: each name's
GluonConfig flags (its sizes come from gluon_launch.default_config at a head dim). Data only, so
that tests/test_gluon.py (under the interpreter) and tests/gluon_sm90.py (Gluon's real compiler, a
process of its own) read the same table.

v1: one partition; ws: warp-specialized (a TMA producer and two consumer warpgroups); pp: ws with
the consumers taking turns (mbarriers), ppe also rescaling the accumulator while q·kᵀ runs; wsp:
ws as a persistent kernel; after "wsp" a "3": three consumer warpgroups, "s": the causal walk split
in two loops, "t": the output stored by TMA, "p": the persistent ping-pong (named barriers); a
trailing "h" adds the hold (gluon._hold). wsptpx: wsptp with the row max taken after the score's
factor (GluonConfig.raw_max off), the control of gluon's note on the row max.
"""


KINDS = {"v1": {}, "ws": dict(ws=True), "pp": dict(ws=True, pingpong=True),
         "ppe": dict(ws=True, pingpong=True, early=True)}
KINDS.update({kind + "h": dict(flags, hold=True) for kind, flags in list(KINDS.items()) if kind != "v1"})
for three in ("", "3"):
    for split in ("", "s"):
        for store in ("", "t"):
            for turns in ("", "p", "ph"):
                KINDS[f"wsp{three}{split}{store}{turns}"] = dict(
                    ws=True, persistent=True, consumers=3 if three else 2, split=bool(split),
                    tma_store=bool(store), pingpong=bool(turns), hold=turns == "ph")
KINDS["wsph"] = dict(ws=True, persistent=True, hold=True)  # the persistent kernel with the hold, no turns
KINDS["wsptpx"] = dict(KINDS["wsptp"], raw_max=False)
# a trailing "d" on a split kind: its last key tile on the first half of its keys where the rest lie
# past the diagonal (GluonConfig.half; gluon's note on the diagonal's half)
KINDS.update({kind + "d": dict(flags, half=True) for kind, flags in list(KINDS.items()) if flags.get("split")})
# a trailing "f" on a persistent kind: the epilogue by each row's reciprocal and the LSE's log2 by the
# hardware's approximation (GluonConfig.fast_epilogue; gluon's note on the epilogue's arithmetic)
KINDS.update({kind + "f": dict(flags, fast_epilogue=True) for kind, flags in list(KINDS.items())
              if flags.get("persistent")})
# a trailing "q" on a persistent kind: two Q buffers a consumer (GluonConfig.q_buffers; gluon's note
# on Q buffers)
KINDS.update({kind + "q": dict(flags, q_buffers=2) for kind, flags in list(KINDS.items()) if flags.get("persistent")})
