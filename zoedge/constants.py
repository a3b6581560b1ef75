"""Numbers that more than one module relies on, in one place (standard library only)."""

from __future__ import annotations

# ---- training: the head start -------------------------------------------------------------------------
PROMPT_SEARCH_EXAMPLES = 2000  # labelled examples per candidate template when the device picks its prompt
PROMPT_SEARCH_MIN_EXAMPLES = 50  # below this the prompt search is skipped (held-out accuracy is noise)
# A decoder keeps its probe head start only when it beats the exported (zero-shot) head on the eval data by more
# than this many paired standard errors of the per-example score; k-shot eval sets are too small to tell otherwise.
# (`zoedge train --min-gain-se` applies the same test to the kept ZO step; off by default, docs/learning.md round 8.)
HEAD_START_MIN_GAIN_SE = 2.0

# ---- training: label-prior adaptation from unlabelled device data (runtime/prior.py) ---------------------------
UNLABELLED_LIMIT = 512  # unlabelled texts read for the EM estimate of their label prior (one forward each)
PRIOR_EM_TOL = 1e-6  # EM stops when no class's estimated prior moves by more than this
PRIOR_EM_MAX_ITER = 1000
PRIOR_FLOOR = 1e-3  # an estimated class prior is kept at least this, so its log (the bias shift) stays finite
# EM trusts the model's posteriors; a model no better than a constant on the eval set has none worth trusting, and EM
# then drifts to a corner (MiniLM Drugs.com k=16, val 40% of 48: 0.001 / 0.109 / 0.890 after 733 iterations, every
# test text called positive). The shift applies only when the kept model's eval accuracy beats the eval set's
# majority-class rate by this many binomial standard errors (with --eval; without one it is not checked).
PRIOR_MIN_SE = 2.0

# ---- training: the divergence guard (runtime/guard.py) ------------------------------------------------
SNAPSHOT_EVERY = 10  # steps between in-memory snapshots the guard can roll back to (a verified good state)
MAX_FAILED_ROLLBACKS = 12  # consecutive rollbacks without progress past the failing step before giving up
HARD_BATCH_RETRIES = 3  # a finite loss blow-up seen this often at one step, lr already cut, is a hard batch
# The guard's lr cuts compound over a run (x0.5 per rollback, harder in a row) and are never undone. A run that gets
# past its last failure only below this fraction of the set lr stops there: a thousand such steps move the tensors
# less than one step at the set lr (round 9: SmolLM2 Drugs.com spent its last 100 steps, 650 s, at lr 8e-26; MiniLM
# BBC, 163 rollbacks, its last 600 steps at lr 5e-27 or less).
LR_CUT_FLOOR = 1e-3
LOSS_BLOWUP_FACTOR = 3.0  # a step diverged when its lowest loss > FACTOR * |lowest running mean| + 1
TENSOR_ABS_LIMIT = 1e4  # a trainable value beyond max(this, TENSOR_GROWTH_LIMIT * its start) has exploded
TENSOR_GROWTH_LIMIT = 100.0

# ---- training: memory ---------------------------------------------------------------------------------
KEEP_Z_BYTES = 64 << 20  # keep a step's z in memory below this many bytes of moved trainables, else regenerate
# glibc's heap can fragment under the forwards' per-call allocations: memory they free stays resident and is not
# reused (SmolLM2 int8, BBC texts at batch 5: +3.4 MB of free heap per forward, 102 forwards after a
# training start took RSS from 498 to 713 MB while the memory in use stayed at 187 MB). Every this many forwards
# the free heap goes back to the OS (malloc_trim; runtime/memory.py).
HEAP_TRIM_EVERY = 8

# Linear-probe head start: the L2 grid (on standardised features) searched by held-out cross-entropy, and the L2
# used when there is nothing to hold out (under 50 examples and no eval set). A decoder's probe shrinks towards
# its zero-shot label-word head, so the top of the grid gives that head back.
PROBE_L2_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0)
PROBE_DEFAULT_L2 = 1e-1
# The trainer's plain-probe head start uses L2 >= this / examples (a fixed-strength Gaussian prior on the sum of
# the examples' losses): 31 at k = 16 x 2 classes, 0.5 at 2,000 examples, 0.03 at 30,000 (docs/learning.md).
PROBE_WARM_START_STRENGTH = 1000.0

# ---- fleet: seed-pool ZO (runtime/seedpool.py) ---------------------------------------------------------
# Candidate seeds in a fleet's pool (FedKSeed, arXiv 2312.06353): every step of every device draws its direction
# from them, and a patch is one float32 coefficient per seed. The fleet server accepts pools of this size only.
SEED_POOL_K = 1024
