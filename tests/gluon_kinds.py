"""The Gluon forward's kernel kinds by the short names the sm_90 compile checks and the H200's
benchmarks use: each name's GluonConfig flags (its sizes come from gluon_launch.default_config at
a head dim). Data only, so that tests/test_gluon.py (under the interpreter), tests/gluon_sm90.py
(Gluon's real compiler, a process of its own) and benchmarks/gluon_check.py read the same tables.

v1: one partition; ws: warp-specialized (a TMA producer and two consumer warpgroups); pp: ws with
the consumers taking turns (mbarriers), ppe also rescaling the accumulator while q·kᵀ runs; wsp:
ws as a persistent kernel; after "wsp" a "3": three consumer warpgroups, "s": the causal walk split
in two loops, "t": the output stored by TMA, "p": the persistent ping-pong (named barriers); a
trailing "h" adds the hold (gluon._hold). Then the twins' letters (TWINS, below: d, h, f, q, x, b, k, m).
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

# The twins: a letter after a kind's name for the same kernel with more flags set, as (letter, the
# flags it sets, whether a kind of these flags takes it), applied in this order (so "wspstpdfq").
# KINDS below and benchmarks/gluon_check.variants (which adds each kind's tile to the name) build
# their twins from this one table.
TWINS = (
    # the last key tile on the first half of its keys where the rest lie past the diagonal
    # (GluonConfig.half; gluon's note on the diagonal's half): split walks
    ("d", dict(half=True), lambda flags: flags.get("split", False)),
    # with the hold (gluon._hold), which keeps ptxas's wait for p·v below the softmax
    ("h", dict(hold=True), lambda flags: flags.get("half", False) and not flags.get("hold", False)),
    # the epilogue by each row's reciprocal, the LSE's log2 by the hardware's approximation
    # (GluonConfig.fast_epilogue; gluon's note on the epilogue's arithmetic)
    ("f", dict(fast_epilogue=True), lambda flags: flags.get("persistent", False) and not flags.get("hold", False)),
    # two Q buffers a consumer (GluonConfig.q_buffers; gluon's note on Q buffers)
    ("q", dict(q_buffers=2), lambda flags: flags.get("persistent", False) and not flags.get("hold", False)),
    # the row max after the score's factor (GluonConfig.raw_max off), the control of gluon's note on
    # the row max
    ("x", dict(raw_max=False), lambda flags: flags.get("persistent", False)),
    # each program's output tiles from the launcher's table (GluonConfig.balanced; gluon's note on the
    # balanced order), balanced by work where causal: the causal routes' kinds (split, the epilogue by
    # reciprocals) and the persistent kinds that do not split (plain specs: the kernel's own order)
    ("b", dict(balanced=True), lambda flags: flags.get("persistent", False) and flags.get("raw_max", True)
     and (flags.get("fast_epilogue", False) or not flags.get("split", False))),
    # p converted for p·v two elements at a time in PTX (GluonConfig.pack_p; gluon's note on p's
    # conversion): persistent kinds
    ("k", dict(pack_p=True), lambda flags: flags.get("persistent", False) and not flags.get("hold", False)),
    # the keep-predicate applied by its sign (GluonConfig.sign_mask; gluon's note on the mask as a
    # sign): kinds with p packed
    ("m", dict(sign_mask=True), lambda flags: flags.get("pack_p", False)),
)


def with_twins(kinds: dict) -> dict:
    """``kinds`` (name: flags) and, for each of TWINS in turn, the twin of every kind that takes it."""
    for letter, extra, takes in TWINS:
        kinds.update({name + letter: {**flags, **extra} for name, flags in list(kinds.items()) if takes(flags)})
    return kinds


with_twins(KINDS)
