"""Turn gpu_suite.py's JSON files into benchmarks/gpu_decode.{md,json,png}, gpu_capacity.{md,json},
gpu_generate.{md,json} and gpu_calibration.{md,json}.

    python benchmarks/gpu_report.py RUN.json [RUN.json ...] [--out benchmarks]

Each run's JSON (benchmarks/gpu_runs/) keeps its own command, versions and date; every row below names its run.
Within one (shape, context, batch) all rows come from the same run, measured side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

COMMITS = {  # code each committed run measured (gpu_suite.py was run from a checkout of this commit)
    "run1_2026-11-29": "b83d9ab + uncommitted suite changes (tiles kernel only; value-slot correction on)",
    "run2_2026-11-29": "569f923 (fields kernel added)",
    "run3_2026-11-29": "e65c302 (64-bit offsets; fields kernel register cap 128)",
    "run4_2026-11-29": "26c9712 (fields kernel with the register lookup table and fp16 dequantisation, lutx)",
    "run5_2026-11-29": "ee306ff (lutx default with the 128-register cap)",
    "run6_2026-11-29": "ee306ff",
    "run7_2026-11-29": "eb709e5 (cached launch plans) + gpu_suite.py's generate section through model.generate",
    "run8_2026-11-29": "eb709e5 + gpu_suite.py's generate through model.generate and the occupancy sweep",
    "run9_2026-11-29": "eb709e5 + gpu_suite.py as committed after it (a new prompt length each round)",
    "run10_2026-11-29": "7a6d0b8 (natural kernel, first version)",
    "run11_2026-11-29": "bf00830 (natural kernel: all loads at the top of a block; reload option)",
    "run12_2026-11-29": "b242e47 (natural kernel: wide_loads option)",
    "run13_2026-11-29": "ae896af (natural kernel the default at every width)",
    "run14_2026-11-29": "a1d5123 (natural kernel the default for 3/4-bit storage, fields for 2-bit)",
    "run15_2026-11-29": "620c395 (hi_pairs option; removed after this run, bb639bd)",
    "run16_2026-11-29": "bb639bd (natural kernel enabled at head_dim 64, BT 32 / 2 warps)",
    "run17_2026-11-29": "5d9cf30 (natural kernel at head_dim 64 with BT 128 / 4 warps by default)",
    "run18_2026-11-29": "92ea1fd (per-step scalars not specialised by Triton)",
    "run19_2026-11-29": "d45d89a (CUDA-graph decode steps, the default on CUDA)",
    "run20_2026-11-29": "afa06a6 (CUDA-graph decode steps without the storage <-> graph reference cycle)",
    "run21_2026-11-30": "bc97aeb (natural kernel for token-group value rows with any slot count)",
    "run22_2026-11-30": "18f2f6f (CUDA graphs for the tiles kernel and for padded batches)",
    "run23_2026-11-30": "3f3b16b (decode rows: token-group values with the natural and the tiles kernel)",
    "run24_2026-11-30": "ad6fd59 (as run 23; reports only)",
    "run25_2026-11-30": "d5bac77 (token-group slots: one min-reduction per pass)",
    "run26_2026-11-30": "17b1427 (token-group slots sorted by element with per-head run ends; one loop per run)",
    "run27_2026-11-30": "05568ac (runs: first 4 ranks preloaded, static passes; reverted after this run)",
    "run28_2026-11-30": "49cf810 (as run 26; slots sweep)",
    "run29_2026-11-30": "2713a86 (token-group value codes stored per head)",
    "run30_2026-11-30": "7dceb05 (as run 29 plus the previous session's review refactors)",
    "run31_2026-11-30": "7dceb05 + the prefetch experiment (PTX prefetch into L1 / L2, and 'top': token-group run "
                        "bounds loaded at the top of a block, dropped before 6ecae3b)",
    "run32_2026-11-30": "6ecae3b's kernels (PTX prefetch of the next block into L2, the default)",
    "run33_2026-11-30": "6ecae3b's kernels",
    "run34_2026-11-30": "6ecae3b's kernels",
    "run34b_2026-11-30": "6ecae3b's kernels with kernels.PREFETCH_DEFAULT = False",
    "run35_2026-11-30": "6ecae3b (the -noprefetch generate cache)",
    "run36_2026-11-30": "f857163 (round_details: per-round token gaps and graph replays)",
    "run49_2026-11-30": "638df02 (the Gluon pairs kernel in the library, first version; eager timings)",
    "run50_2026-11-30": "0bb5127 (pairs kernel: slots turned into level residuals through a code lookup; one wave of "
                        "programs; rows timed as CUDA-graph replays)",
    "run53_2026-11-30": "079b7f3 (pairs kernel: slots replace their levels; no branch in the chunk loop)",
    "run54_2026-11-30": "079b7f3",
    "run55_2026-11-30": "435a6a7 (the previous session's final code: pairs only in graph steps, sm_90 default)",
    "run58_2026-11-30": "34ff711 (pairs kernel with token-group values, two slot ranks per merge pass; reverted "
                        "after this run for its decode time, run58_pairs_probe.txt)",
    "run62_2026-11-30": "f19dfe4 (pairs kernel: token-group value slots as level residuals in a shared-memory tile, "
                        "added through ldmatrix; the scatter's rows prefetched into L1)",
    "run66_2026-11-30": "5c12a0d (pairs kernel: token-group slots four ranks at a time, run bounds loaded a block "
                        "ahead; reverted after this run by 1400921)",
    "run67_2026-11-30": "5c12a0d (as run 66: the head-group and natural rows ran kernels SASS-identical to the "
                        "shipped ones; the token-group pairs row ran run 66's reverted scatter)",
    "run68_2026-11-30": "1400921 (the shipped kernels: the pairs kernel as 6f494c9)",
    "run70_2026-11-30": "4da2eb7 (the pairs kernel's splits as short as one block: short contexts fill the wave)",
    "run71_2026-11-30": "a563a50 (the pairs kernel reads 2-bit codes too: nuq2 rows beside the fields kernel)",
    "run72_2026-11-30": "145c535 (the 1M-token step also as a CUDA-graph replay with the pairs kernel)",
    "run77_2026-11-30": "19bb49c (the pairs kernel reads 4-bit codes too: nuq4 rows beside the natural kernel)",
    "run81_2026-11-30": "defd4e8 (graph steps take the pairs kernel for nuq4 since 4a430d5; kernels as run 77)",
    "run84_2026-11-30": ("242a9e6 (kernels as run 77; the -fused-eager-pairs cache sets "
                         "EAGER_PAIRS_MIN_TOKEN_HEADS = 0)"),
    "run85_2026-11-30": "61cfbf4 (eager steps take the pairs kernel from 3M quantized token-heads)",
    "run92_2026-11-30": "b5a105f (graph steps take the pairs kernel at head_dim 64 since dac6b26)",
    "run93_2026-11-30": "f38c783 (the pairs kernel at head_dim 64 beside the natural and tiles kernels)",
    "run98_2026-11-30": "1dbf792 (the Gemma-3-4B shape, head_dim 256: the Triton kernels, no pairs kernel there)",
    "run99_2026-11-30": "1dbf792 (-fused-eager-pairs caches at head_dim 64; kernels as run 93)",
    "run100_2026-11-30": "6850cbb (diag sweep d256: the natural kernel's launches at head_dim 256)",
    "run101_2026-11-30": "6850cbb (diag sweep d256b: reload x split counts at head_dim 256)",
    "run102_2026-11-30": "6c5f229 (head_dim 256: the natural kernel with reload and the two-wave split rule)",
    "run103_2026-11-30": "6c5f229 (diag sweep d256c: token-group values, reload and the split rule apart)",
    "run104_2026-11-30": "7afec96 (head_dim 256: token-group values without reload)",
    "run105_2026-11-30": "141131f (the Triton kernels' split cap rounded up: 16 splits for 4095 tokens)",
    "run106_2026-11-30": "a539923 (the pairs kernel at head_dim 256: two programs per split, up to 3 key slots)",
    "run107_2026-11-30": "a539923 (as run 106; 16K and 64K)",
    "run111_2026-11-30": "9a1bccc (sliding-window layers still dequantized and attended with SDPA)",
    "run112_2026-11-30": "a2fad18 (sliding-window layers through the fused kernel since 1798dd5; -slidingref: the old "
                         "path)",
    "run112b_2026-11-30": "a2fad18 (as run 112; 128K)",
    "run122_2026-11-30": "390fe59 (head_dim 256: the key slots through a per-chunk shared-memory tile)",
    "run138_2026-12-01": ("39360ea (the decode matrix on the current code: head_dim 256 in two passes from 32K "
                          "token-heads, the split merge over channel blocks; the head_dim-128 kernels as in run 77)"),
    "run142_2026-12-01": ("e957274 (kernels as run 143, eager default as before; the -eager-pairs caches "
                          "take the pairs kernel from 200K token-heads, i.e. on the 6 global layers only)"),
    "run143_2026-12-01": ("562dbd8 (the decode matrix on the final kernels: the split merge over 16 channels, "
                          "kernels.REDUCE_DC; the kernels themselves as in run 138)"),
}

# runs kept in gpu_runs/ as records whose decode rows the report must not take as the latest: what they measured is
# not the shipped code
DECODE_SKIP = {"run66_2026-11-30": "its token-group pairs rows ran a scatter reverted after the run "
                                   "(gpu_notes.md, eighth session); run 62 stays the decode matrix"}

# runs whose generate section is incomplete: listed after the full run, never taken as the latest
PARTIAL_GENERATE = {"run20_2026-11-29", "run29_2026-11-30", "run34_2026-11-30", "run34b_2026-11-30",
                    "run35_2026-11-30", "run36_2026-11-30", "run54_2026-11-30", "run58_2026-11-30"}

# gpu_suite.py labelled every head-group KVQuant row "kvquant-fields" until it asked the library which kernel ran
# (kernels.decode_kernel, added after run 13); in run 13 the diag sweep chose {"kernel": "natural"} for those rows
IMPL_FIX = {"run13_2026-11-29": {"kvquant-fields": "kvquant-natural"}}


RUN_NOTES = {  # what a reader must know about a run's rows
    "run71_2026-11-30": ("The full matrix after the pairs kernel learnt 2-bit codes (bf24084: the low plane alone, "
                         "two ALU instructions less per pair lookup; the 3-bit kernels compile to the same SASS as "
                         "before). nuq2-1% head-group through the pairs kernel: 1.02-1.07x the best fp16 from 16K "
                         "(Llama-3-8B 128K batch 1: 133.0 us against SDPA's 136.3; Llama-2-7B 512K: 1729 against "
                         "1854), 0.66x at 4K batch 1 and 0.97x at Llama-2-7B 128K batch 8; 1.33-3.34x the fields "
                         "kernel it replaces in graph steps. The nuq3 and fp16 rows repeat run 62 / run 70 within "
                         "0.5% (SDPA 1-2.4% faster here). Preceded in the same call by a pytest selection that "
                         "matched no test; the GPU tests of this code ran in the next two calls "
                         "(gpu_runs/gpu_tests_2026-11-30_runs71-74.txt, all passed)."),
    "run77_2026-11-30": ("The full matrix after the pairs kernel learnt 4-bit codes (4a430d5: a byte per channel "
                         "pair, 256-entry pair tables replicated over 8 lane groups; the 2- and 3-bit kernels "
                         "compile to the same SASS as before). nuq4-1% head-group through the pairs kernel: "
                         "0.75-0.85x the best fp16 from 4K batch 8 and 16K batch 1 (Llama-3-8B 128K batch 1: 173.4 "
                         "us against SDPA's 139.4), 0.65x at 4K batch 1; 1.8-4.0x the natural kernel, the eager "
                         "default. Token-group nuq3 rows run a77a63b's slot tile for the first time in a full "
                         "matrix: 0.96-1.02x run 71's latencies (median 0.98); every other KVQuant row repeats run "
                         "71 within 1.5%, SDPA 1-2.5% slower here. Followed in the same call by test_decode_pairs_gpu"
                         "[fp16] and the 4-bit graph-steps test (passed; gpu_runs/gpu_tests_2026-11-30_run77.txt)."),
    "run70_2026-11-30": ("4K and 16K only, after the pairs kernel's splits became as short as one block (4da2eb7; "
                         "run 69's sweep, gpu_runs/run69_splits_sweep.txt): at batch 1 short contexts now fill the "
                         "wave. Llama-3-8B 4K batch 1: head-group 25.3 us (run 62: 49.5), token-group 26.5 (54.7); "
                         "16K: 36.4 (50.6) and 40.7 (56.5); Llama-2-7B 4K: 36.5 (46.7) and 41.6 (56.3). Batch 8 and "
                         "Llama-2-7B at 16K get the same split counts as before (within 1-7% of run 62). The "
                         "contexts from 64K come from run 62: the rule gives them the same splits. Followed in the "
                         "same call by the graph-steps test (head/2, token/8: passed)."),
    "run67_2026-11-30": ("128K, four caches, two rounds: DynamicCache 64.2 ms per token (its faster round), KVQuant "
                         "token-group 24.8 ms (2.59x), head-group 24.5 ms (2.63x), token-group with the natural kernel "
                         "(KVQUANT_PAIRS=0) 27.8 ms. The token-group pairs row ran run 66's scatter, reverted after "
                         "the run (within 2% of the shipped kernel per layer at 128K, run 66 against run 62); the "
                         "head-group and natural rows ran kernels SASS-identical to the shipped ones. Run 68 repeats "
                         "it on the shipped code."),
    "run81_2026-11-30": ("128K, nuq4-1% head-group values: the pairs kernel (the default in graph steps since "
                         "4a430d5) against the natural kernel it replaced (KVQUANT_PAIRS=0) and DynamicCache, two "
                         "rounds. Round by round: DynamicCache 72.9 / 64.5 ms per token, pairs 30.9 / 51.0, natural "
                         "27.0 / 34.1, so KVQuant is 1.26-2.70x DynamicCache. Per layer the pairs kernel is 2.4x the "
                         "natural one (173 against 422 us at 128K, run 77): 5.5 against 13.5 ms of GPU time in a "
                         "27-51 ms step. The step is bound by the host, which drifted by more than that between "
                         "rounds, so this run does not separate the two kernels end to end."),
    "run98_2026-11-30": ("head_dim 256 (Gemma-3-4B's heads: 8 query, 4 KV), first timed: no pairs kernel compiles "
                         "there, so the natural kernel (nuq3/nuq4, and nuq2 beside the fields kernel, which was the "
                         "2-bit default before this run) and the tiles kernel (token-group values) run: 0.14-0.38x "
                         "the best fp16."),
    "run106_2026-11-30": ("head_dim 256 with the pairs kernel, first timed (a539923: two one-warp programs per split, "
                          "one per value half, each computing all the scores; 3 key slots per vector at 1%): "
                          "1.16-2.06x the natural kernel at 128K (nuq3-1% head-group 387.8 against 487.6 us at batch "
                          "1, token-group 387.1 against 746.6), still 0.35-0.44x the best fp16. Its pairs rows at 4K "
                          "ran one-block splits (128 at batch 1); the default since 23e5f04 takes two blocks per "
                          "split there (64 splits), which run 108's sweep measured at 56.3 us head-group and 59.6 "
                          "token-group against 62.7 and 65.5 (gpu_runs/run108_splits_d256.txt)."),
    "run107_2026-11-30": ("Run 106's code at 16K and 64K: at 16K batch 1 the natural kernel stays ahead for head-group "
                          "2/3-bit storage (71.6 / 62.8 us against the pairs kernel's 92.2 / 86.8), so graph steps "
                          "take the pairs kernel there only from kernels.PAIRS_D256_HEAD_MIN_TOKEN_HEADS (1885dbf)."),
    "run122_2026-11-30": ("head_dim 256 with the key slots through a per-chunk shared-memory tile (390fe59; before, 3 "
                          "slots were merged into every key register and ptxas spilled in the hot loop): the pairs rows"
                          " against runs 106-107's, same shapes, 1.10-1.41x (128K batch 1: nuq3-1% head-group 310.0 "
                          "against 387.8 us, token-group 320.4 against 387.1, nuq2 275.2 against 356.4, nuq4 392.9 "
                          "against 435.5); 0.39-0.60x the best fp16 at 128K (0.50-0.54x for nuq3). At 16K batch 1 the "
                          "natural kernel stays ahead for head-group 2/3-bit storage (71.9 / 62.6 us against 79.7 / "
                          "72.2), so kernels.PAIRS_D256_HEAD_MIN_TOKEN_HEADS is unchanged, although at 4K batch 1 the "
                          "pairs kernel is now ahead (46.5 / 41.5 against 58.3 / 47.0)."),
    "run138_2026-12-01": ("The whole matrix again, on 39360ea (before the split merge over 16 channels of run 139, "
                          "which takes 1-3% off batch 1: gpu_runs/run139). head_dim 128: the "
                          "pairs rows within 3% of runs 71 / 77 (the kernels are SASS-identical; Llama-3-8B 128K "
                          "batch 1 nuq3-1% head-group 158.5 against 158.3 us, token-group 185.3 against 180.0). "
                          "head_dim 256 (Gemma-3-4B heads): the scores computed once per block (two launches from 32K "
                          "token-heads, fa10514) and the split merge over channel blocks (8508785) took the pairs rows "
                          "at 128K batch 1 from run 122's 310.0 to 235.1 us (nuq3-1% head-group), 320.4 to 238.9 "
                          "(token-group), 275.2 to 202.9 (nuq2), 392.9 to 295.3 (nuq4); batch 8 1.3-1.5x. At 256 our "
                          "fp16 split-K kernel is faster than SDPA (156.1 against 177.6 us at 128K batch 1), so the "
                          "speedups there are against it."),
    "run111_2026-11-30": ("A random-weight Gemma-3-4B-shaped model (28 sliding-window layers of 1024 tokens, 6 global "
                          "ones at head_dim 256), first through generate. The fused kernels then served the global "
                          "layers only; each sliding layer dequantized its window with the PyTorch reference path "
                          "every step. The host's speed drifted by up to 1.7x between rounds of one cache (head-group "
                          "32K: 97.7 then 163.6 ms), so the rows do not separate the caches; "
                          "gpu_sliding_steps.md (run 113) does, step by step."),
    "run112_2026-11-30": ("The sliding-window layers through the fused kernel (the natural kernel, eagerly; the "
                          "decode_kernels of a row list it beside the pairs kernel of the global layers) against "
                          "the old path (-slidingref), three rounds. The host switched between about 65, 97 and "
                          "150-220 ms per step within rows (DynamicCache 130.7 / 222.1 / 98.9 ms in its three "
                          "rounds), so read gpu_sliding_steps.md (run 113: the same caches interleaved step by step, "
                          "1.37x DynamicCache against 0.94x for the old path at 32K) for the comparison."),
    "run112b_2026-11-30": ("Run 112's code at 128K, one round (the call's time): DynamicCache 100.5 ms, the sliding "
                           "layers through the fused kernel 96.7, through SDPA 144.2. Run 113 measured the same "
                           "three interleaved: 143.8 / 103.2 / 148.6 ms (1.39x and 0.96x DynamicCache)."),
    "run99_2026-11-30": ("Eager steps (KVQUANT_CUDA_GRAPHS=0) at head_dim 64, batch 8, 16 layers, nuq3-1% head-group: "
                         "the natural kernel against the pairs kernel launched eagerly, to place the eager threshold "
                         "at 64. The host drifted between rounds (64K pairs 39.1 then 33.0 ms)."),
    "run102_2026-11-30": ("head_dim 256 after runs 100-101: the natural kernel reloads its loop invariants every "
                          "block and splits about two waves wide (at least 64 splits); the natural-run98launch rows "
                          "run the launch before (no reload, four waves), the fields rows nuq2's former default. Its "
                          "64K rows stay the report's: the token-group default there still reloaded (7afec96 "
                          "stopped that; neutral at 128K, run 103). Its 4K / 16K run98launch rows took 16 / 64 "
                          "splits where run 98 took 15 / 63 (counted from the context, not the quantized tokens)."),
    "run104_2026-11-30": ("Run 102's 4K and 128K cells after token-group values stopped reloading (7afec96). The "
                          "4K run98launch rows took 16 splits where the defaults took 15 (fixed in 141131f)."),
    "run105_2026-11-30": ("4K and 16K at head_dim 256 after the Triton kernels' split cap was rounded up "
                          "(141131f: 16 splits of 8 blocks for 4095 tokens instead of 15 of 9); the run98launch "
                          "rows count their splits as run 98 did."),
    "run143_2026-12-01": ("The whole matrix again on the final code (562dbd8): run 138's kernels with the split "
                          "merge over 16 channels per program (kernels.REDUCE_DC, run 139). Batch 1 against run 138: "
                          "Gemma-3-4B heads 3-9% faster (128K nuq3-1% head-group 226.9 against 235.1 us), "
                          "Llama-3-8B 1-11% (128K 156.8 against 158.5; 4K 22.7 against 25.4), Llama-2-7B within 3%; "
                          "batch 8 within 1.5%. SDPA ran up to 2% slower than in run 138, so the same-run ratios "
                          "moved up by that much as well (Llama-3-8B 128K batch 1 nuq3-1% 0.88x, nuq2-1% 1.05x)."),
    "run142_2026-12-01": ("Eager steps (KVQUANT_CUDA_GRAPHS=0) at head_dim 256, Gemma-3-4B shape, batch 8, 16K: the "
                          "natural kernel (the eager default at 256 until then) against the pairs kernel on the 6 "
                          "global layers (1.05M token-heads of head_dim 128 each; the 1K sliding windows keep the "
                          "natural kernel in both). Head-group values: even (58.0 / 61.1 ms against 58.4 / 57.4); "
                          "token-group values: pairs 56.2 / 65.3 against 89.5 / 74.3. The 64K rows did not run: the "
                          "prefill's SDPA with Gemma's sliding mask needed 64 GiB more than was free. With run 138's "
                          "per-call times (the pairs kernel 2.4x / 3.6x the natural kernel at 64K batch 8), eager "
                          "steps take the pairs kernel at 256 from the same 3M token-heads as at 64 and 128."),
    "run84_2026-11-30": ("Eager steps (KVQUANT_CUDA_GRAPHS=0, as with an fp16 window R > 0) at batch 8, 8 layers: "
                         "the natural kernel (the eager default until then), the pairs kernel launched eagerly, and "
                         "the default CUDA-graph steps. 32K (2.1M token-heads): pairs 20.6 / 17.7 ms per step "
                         "against 18.2 / 14.5 for the natural kernel, slower: the Gluon launch costs the host about "
                         "200 us and the step is host-bound. 64K (4.2M): 12.3 / 12.7 against 20.1 / 19.6, 1.55-1.63x "
                         "faster, as fast as the graph steps (13.8 / 12.2). So eager steps now take the pairs kernel "
                         "from 3M quantized token-heads (61cfbf4)."),
    "run92_2026-11-30": ("A Llama-3.2-1B-shaped model (16 layers, 32 query / 8 KV heads, head_dim 64) at 128K: the "
                         "pairs kernel, the default in graph steps at head_dim 64 since this code, against the natural "
                         "kernel it replaced (KVQUANT_PAIRS=0) and DynamicCache. Round by round: DynamicCache 90.6 / "
                         "91.1 ms per token, token-group KVQuant 19.0 / 23.3 with the pairs kernel and 27.0 / 24.4 "
                         "with the natural one, head-group 21.7 / 17.4: KVQuant 3.9-5.2x DynamicCache (whose 90 ms "
                         "step for 16 layers was not profiled here). Per layer the pairs kernel saves about 140 us of "
                         "GPU time (122 against 265 us, run 91), 2.3 ms per step; the rounds differ by more than "
                         "that (pairs 1.42x natural in round 1, 1.05x in round 2), so this run does not separate the "
                         "kernels end to end."),
    "run85_2026-11-30": ("Run 84's shapes on 61cfbf4, to check the new eager default: it chose the natural kernel "
                         "at 32K and the pairs kernel at 64K (decode_kernels in the JSON). A slower machine start: "
                         "the graph steps took 14.8-16.5 ms against 11.4-13.8 in run 84, and the eager 64K step "
                         "22.3 / 23.8 ms; compare within a run."),
    "run68_2026-11-30": ("Run 67's command on the shipped code (1400921), four minutes later on a fresh machine start: "
                         "every row slower than in run 67, by up to 1.9x (head-group 45.8 / 53.4 ms in its rounds "
                         "against 24.5 / 27.6, with SASS-identical kernels; DynamicCache 95.1 against 64.2). At batch "
                         "1 the step is bound by the host, whose speed differs between machine starts; the slow "
                         "head-group rounds of runs 33-34 (45-48 ms) came back. Token-group KVQuant: 27.8 ms, 3.43x "
                         "DynamicCache in this run (2.59x in run 67). Read the two runs together."),
    "run62_2026-11-30": ("The full decode matrix, every row a CUDA-graph replay, after the pairs kernel's token-group "
                         "slots moved to a shared-memory tile (f19dfe4): nuq3-1% token-group (the calibration "
                         "default) 185.4 us at 128K batch 1 on the Llama-3-8B shape, 0.745x the best fp16 (run 57's "
                         "merge passes: 250.1 us, 0.54x SDPA); head-group 156.9 us (0.881x). Preceded in the same "
                         "session by the GPU tests of this code (gpu_runs/gpu_tests_2026-11-30_runs59-62.txt) and "
                         "followed in the same call by test_decode_pairs_gpu[fp16] and the token-group graph-steps "
                         "test: passed."),
    "run55_2026-11-30": ("The full decode matrix on the previous session's final code (435a6a7), every row a "
                         "CUDA-graph replay: the pairs kernel (head-group nuq3-1%) 158.3 us at 128K batch 1, 0.863x "
                         "the best fp16, as in run 53. The token-group rows predate the pairs kernel's token-group "
                         "path (139a45c): gpu_runs/run57_pairs_probe.txt measured it at 250.1 us at 128K batch 1 "
                         "against the natural kernel's 459.2 (1828.2 against 5081.9 at batch 8). Preceded in the same "
                         "call by the GPU tests (13 passed before the call's timeout, none failed; "
                         "gpu_runs/gpu_tests_2026-11-30_runs55-57.txt)."),
    "run58_2026-11-30": ("128K, DynamicCache and the token-group KVQuant cache (the calibration default) with the "
                         "pairs kernel (the new default in graph steps; this run's code, 34ff711, merged two slot "
                         "ranks per pass and was reverted for its decode time: 286.5 against 250.1 us per layer) and "
                         "with the natural kernel (KVQUANT_PAIRS=0), two rounds: 25.6 / 27.5 ms per token with the "
                         "pairs kernel, 28.4 / 28.0 ms with the natural kernel (1.10x at the best rounds), 116.9 / "
                         "96.0 ms for DynamicCache (slower than run 54's 69.0 ms on another machine start: its "
                         "per-step concatenation follows the host)."),
    "run50_2026-11-30": ("The first decode matrix with the Gluon pairs kernel (kernels/_gluon.py; the default for "
                         "3-bit head-group storage at head_dim 128 on sm_80+ with Triton 3.6), beside the natural "
                         "kernel on the same storage. Every row, fp16 included, is a CUDA-graph replay of the call "
                         "(the eager time is `eager_us` in the JSON): a Gluon launch costs the host about 90 us, more "
                         "than a short batch-1 call takes on the GPU. This code (0bb5127) turned each slot into a "
                         "residual through a code lookup; the final code (079b7f3: the slot's exact level replaces "
                         "the looked-up one, and no branch in the chunk loop) was measured by run 53, which a timeout "
                         "cut short (gpu_runs/run53_2026-11-30.json, rebuilt from its log: Llama-3-8B batch 1 and 8 "
                         "at every context, Llama-2-7B batch 1 at 4K and 16K, the kvquant rows only). There, nuq3-1% "
                         "with the pairs kernel took 158.3 us at 128K batch 1 (0.863x the best fp16, against 0.72x "
                         "here) and 1108.6 us at batch 8 (0.847x); the natural kernel 327.0 and 3775.5 us. Preceded "
                         "by the GPU tests of this code (6 passed, gpu_runs/gpu_tests_2026-11-30_runs49-53.txt)."),
    "run54_2026-11-30": ("128K, the fp16 DynamicCache and the head-group KVQuant cache with the pairs kernel (the "
                         "default) and with the natural kernel (KVQUANT_PAIRS=0), two rounds: 26.3 / 33.4 ms per "
                         "token with the pairs kernel, 27.0 / 35.7 ms with the natural kernel, 69.0 / 72.5 ms for "
                         "DynamicCache. The pairs kernel halves the attention's GPU time (run 53: 158 against 327 us "
                         "per layer, about 5.4 ms per token over 32 layers), but the step moved by 0.7 ms: at batch 1 "
                         "the step is most likely bound by the host (the Python of the model's other modules), not "
                         "by the GPU (not profiled in this run)."),
    "run31_2026-11-30": ("The prefetch sweep, first version: the natural kernel with the next block's rows prefetched "
                         "into L1 or L2 (PTX prefetch), and 'top' (token-group run bounds loaded at the top of a "
                         "block, alone and with a prefetch; dropped: with the prefetch it was slower than the "
                         "prefetch alone)."),
    "run32_2026-11-30": ("Decode matrix with the PTX prefetch of the next block into L2, the new default for the "
                         "natural and fields kernels. Run 30, 8 minutes earlier on the same machine, measured the "
                         "same matrix on the code without it (7dceb05): at 64K-512K the natural kernel's rows are "
                         "1.00-1.12x faster here (nuq3 1.035-1.067x, token-group 1.036-1.10x, nuq4 1.00-1.12x), the "
                         "fields kernel's nuq2 rows 1.02-1.08x (one 1.59x row at 64K batch 1, a slow run-30 row), "
                         "and the rows without the prefetch stay put (SDPA 0.98-1.0x, tiles 0.97-1.01x; our "
                         "split-K fp16 kernel 0.93-1.19x). Run 30's call first ran test_quantize_append_gpu (4), "
                         "test_decode_gpu [3-256] and [4-128] and the CUDA-graph test with token-group values: 7 "
                         "passed. This run's sweep: the prefetch against none for both kernels; followed by "
                         "test_decode_gpu [3-128] and [2-128] (with the prefetch, and explicit l1 / off checks): 2 "
                         "passed."),
    "run33_2026-11-30": ("128K, four caches, two rounds, with the prefetch default. The head-group rounds (48.0 / "
                         "45.0 ms) are far slower than in runs 28-29 (26.7-30.2 ms) and in this session's runs 34b-35 "
                         "(23.2-26.7 ms); runs 34, 34b and 35 (partial runs below) chase it: the head-group rounds "
                         "vary by up to 1.7x with the prefetch on or off, and the interleaved run 35 puts the prefetch "
                         "ahead. Preceded in the same call by the CUDA-graph tests (token-group natural; head-group "
                         "with a left-padded batch) and test_device_lengths_gpu (4): 6 passed."),
    "run34_2026-11-30": "The two KVQuant caches again, with the prefetch: head-group 38.7 / 41.5 ms, token-group 28.2 "
                        "/ 28.6 ms.",
    "run34b_2026-11-30": ("Head-group without the prefetch (kernels.PREFETCH_DEFAULT = False through a wrapper, "
                          "right after run 34 on the same machine): 23.2 / 39.6 ms. So the slow head-group rounds "
                          "come with or without the prefetch."),
    "run35_2026-11-30": ("Head-group with and without the prefetch in one process, interleaved (the suite's "
                         "-noprefetch cache): 24.1 / 23.8 ms with it, 25.8 / 26.7 ms without (1.07-1.12x). The slow "
                         "head-group rounds of runs 33-34 did not come back; their cause was not found."),
    "run36_2026-11-30": ("The two KVQuant caches with the new per-round diagnostics: head-group 22.6 / 22.2 ms, "
                         "token-group 27.9 / 27.7 ms; in every round all 32 layers replayed their CUDA graphs (448 "
                         "replays, no eager fallback) and no token gap exceeded 30 ms, so the slow head-group rounds "
                         "of runs 33-34 did not come back. Preceded in the same call by the first GPU run of "
                         "benchmarks/gluon_decode_study.py (gpu_runs/run36_gluon_study.txt)."),
    "run26_2026-11-30": ("Token-group value rows hold their slots sorted by element plus each KV head's run end "
                         "(`v_out_ends`); the natural kernel reads only its head's run. Preceded in the same call by "
                         "`test_quantize_append_gpu` (4) and `test_decode_gpu` [3-128], [2-64], [3-256]: 7 passed; "
                         "the two graph tests queued after them did not start within the 300 s limit (they passed "
                         "in the calls of runs 27 and 28)."),
    "run27_2026-11-30": ("A variant measured and reverted: the first 4 ranks of each run loaded at the start of a "
                         "block, 4 static passes behind block-uniform branches. Slower than run 26's single loop "
                         "(611 against 585 us; batch 8 7088 against 6650; Llama-2-7B 3778 against 3560). Followed "
                         "in the same call by the graph tests (token-group natural, left-padded batch) and "
                         "`test_decode_gpu[3-128]`: 3 passed."),
    "run28_2026-11-30": ("The slots sweep: nuq3 with and without outlier slots, head-group and token-group values, "
                         "natural kernel. Without slots, token-group values took 446 us against 330 us for "
                         "head-group: the layout of the codes (32-byte pieces of 8-head rows), not the slots, was "
                         "most of the difference; run 29 measures the fix. Generate: 128K only, four caches, two "
                         "rounds, on run 26's kernel. Preceded by the graph test with token-group values (passed)."),
    "run29_2026-11-30": ("Token-group value codes stored per head (like head-group codes). Without slots token-group "
                         "now takes 326 us (head-group 330); with them 494 us (run 26: 585). Generate: 128K, the two "
                         "KVQuant caches only (device time), two rounds; listed as a partial run. Preceded by "
                         "`test_quantize_append_gpu` (4) and `test_decode_gpu` [3-128], [2-64]: 6 passed."),
    "run21_2026-11-30": ("Preceded in the same call by `test_decode_gpu` (killed by its 300 s limit after 5 of 7 "
                         "passed, no failure; the other two passed in run 22's call). The tokengroup sweep: "
                         "token-group values (11 slots per row over 8 KV heads) through the natural kernel's ranked "
                         "slots against the tiles kernel, the default for such rows until this run."),
    "run22_2026-11-30": ("128K only, three caches, two rounds. Preceded in the same call by the GPU tests of the "
                         "graph paths (token-group natural and tiles, d64, a left-padded batch) and the two remaining "
                         "`test_decode_gpu` cases: 7 passed. `kvquant-nuq3-1pct-tokengroup-fused`: token-group values "
                         "(the calibration default; natural kernel, CUDA graphs). The peaks are the first clean "
                         "measurement with graphs (no reference cycle): 32.9 GiB against 45.6 GiB for DynamicCache."),
    "run24_2026-11-30": ("Both contexts, four caches, two rounds, on the code of runs 21-23: head-group and "
                         "token-group values (the calibration default), both with CUDA-graph decode steps. The host's "
                         "speed drifted within the call: the same cache's rounds differ by up to 2x (token group at "
                         "32K: 26.9 / 53.5 ms; DynamicCache at 128K: 117 / 95 ms), so read ratios per round too."),
    "run25_2026-11-30": ("The tokengroup sweep again after the token-group passes became one min-reduction each "
                         "(d5bac77): natural 634 against 662 us (run 21) at batch 1, 7301 against 7952 us at batch "
                         "8; tiles and head-group rows unchanged (1015 / 337 us). Preceded in the same call by "
                         "`test_decode_gpu[3-128]` (passed). A Llama-2-7B decode run after it did not finish within "
                         "its 45 s limit (the session's device time was spent) and left no rows."),
    "run23_2026-11-30": ("Token-group rows run twice: with the default kernel (natural since run 21) and with the "
                         "tiles kernel, side by side. With 32 KV heads (Llama-2-7B) a token-group row holds 41 slots "
                         "and every head's program read all of them (until run 26): that is why those rows are slow."),
    "run1_2026-11-29": "No warm-up before the generate rows: the fused row's prefill includes Triton compilation. "
                       "KVQuantCache used token-group values and the tiles kernel with the value-slot correction "
                       "(the fields kernel did not exist yet), and attended the prompt quantized (prefill='exact' "
                       "came later). The 128K rows and a StaticCache row were not run.",
    "run4_2026-11-29": "The Llama-2-7B batch-8 block ran out of GPU memory (the suite's memory estimate was too low; "
                       "fixed for later runs), so its rows come from run 3 (the fields kernel before lutx).",
    "run5_2026-11-29": "Generate rows: fp16 DynamicCache/StaticCache attend through transformers' SDPA path, whose "
                       "cuDNN attention re-plans for every new key length (benchmarks/gpu_runs/profile_2026-11-29: "
                       "8.7 ms of host time per call); the KVQuant step is host-bound too (2.6 ms of GPU time in a "
                       "23.7 ms 8-layer step at 32K). Eager mode, no CUDA graphs, for every cache.",
    "run7_2026-11-29": "quanto was not installed (its rows failed); both rounds used the same prompt, so round 2 "
                       "repeated every key length of round 1. Superseded by run 9.",
    "run8_2026-11-29": "Both generate rounds used the same prompt: round 2 repeated round 1's key lengths, and fp16 "
                       "DynamicCache then ran 2.7-4x faster (cuDNN's SDPA reuses a plan per shape), which real "
                       "generation never sees. Superseded by run 9 for the generate rows; its launch sweep stands.",
    "run10_2026-11-29": "The natural kernel at block_t 16 gave wrong results (rel. error 1.6); block_t < 32 is "
                        "rejected since bf00830. Loads were not yet hoisted to the top of a block.",
    "run13_2026-11-29": "Every head-group KVQuant row ran the natural kernel, the fastest of the same-run sweep "
                        "(natural 342 us vs fields 434.5 us at 128K, nuq3), including nuq2: the per-width default "
                        "(fields for 2-bit storage) was set from this run's rows, after it. The suite labelled these "
                        "rows kvquant-fields; the report relabels them (IMPL_FIX). The 4K-16K rows sit on the "
                        "host-side launch floor (about 100-370 us for every KVQuant method) and move with host speed.",
    "run14_2026-11-29": "Run with `PYTHONPATH=src:/root/site` after installing the carried optimum-quanto and ninja "
                        "wheels. Three caches only (the device time left): fp16 DynamicCache, quanto int2 and KVQuant "
                        "(natural kernel); StaticCache and quanto int4 are in run 9 below. Every round has its own "
                        "prompt length. KVQuant's peak memory includes the fix of 4def698 (no fp16 copy of the "
                        "prompt kept alive); it matches the 32.9 GiB predicted from run 9.",
    "run15_2026-11-29": ("The hi_pairs option (3-bit high plane loaded contiguously, nibbles paired in "
                         "registers) at the launches static SASS favoured. Natural kernel: 344 us at 4 warps vs 342 "
                         "us for the default (no gain). Fields kernel: 328-450 us but a relative error of 1.6 on the "
                         "GPU (bit-identical under the interpreter): a miscompile of that variant, not investigated. "
                         "The option was removed after this run."),
    "run16_2026-11-29": "head_dim 64 (SmolLM2-135M shape: 9 query / 3 KV heads). Batch 1 rows sit near the host's "
                        "launch floor (about 90-240 us for any kernel) and move between runs; batch 8 at 128K is "
                        "kernel-bound. The sweep chose BT 128 / 4 warps as the head_dim 64 default (run 17 measures "
                        "it).",
    "run17_2026-11-29": "Decode rows of the SmolLM2-135M shape with the natural kernel's head_dim 64 default (BT 128, "
                        "4 warps) next to the tiles kernel it replaces; the token-group storage has 2 value slots "
                        "per vector at this shape, so it runs the natural kernel too. Batch 1 rows sit near the "
                        "host's launch floor. The Llama-3-8B 'blocks' sweep: larger blocks are slower than the "
                        "default (407-541 vs 345 us).",
    "run18_2026-11-29": "Preceded in the same call by the whole GPU test suite (15 passed). The default sweep checks "
                        "that not specialising the per-step scalars costs nothing: natural 335 us, fields 433 us.",
    "run19_2026-11-29": ("`kvquant-nuq3-1pct-fused` is the library default on CUDA since this run: a steady decode "
                         "step of a layer (append + attention + reduce) replayed as a CUDA graph; `-fused-eager` is "
                         "the same kernels launched one by one (KVQUANT_CUDA_GRAPHS=0), the default of runs 9-14. "
                         "The host's speed drifted more than usual (rounds differ by up to 1.9x). **Peak memory**: "
                         "the graph rows had a reference cycle (fixed after this run) that kept each dropped "
                         "KVQuant cache alive until garbage collection, so every row that ran after a graph row "
                         "counts an earlier cache in its peak: dynamic 128K round 1 (53.9 vs 47.2 GiB in round 0), "
                         "quanto, the eager rows, and the graph row at 128K itself (34.6 GiB, which includes a 32K "
                         "cache; run 14 measured 32.9 GiB for the eager path). Read the peaks of run 14 instead."),
    "run20_2026-11-29": ("Cut short by the session's device time: the suite's deadline skipped every row after the "
                         "first two. Preceded by `test_cuda_graph_generate_matches_eager_gpu` (passed) on the code "
                         "with the cycle fixed. Its two rows (which ran first, after no KVQuant cache) give "
                         "DynamicCache 45.6 GiB and quanto int2 32.1 GiB at 128K, as in run 14."),
    "run9_2026-11-29": "Run with `PYTHONPATH=src:/root/site` after installing the carried optimum-quanto and ninja "
                       "wheels into /root/site. Every round has its own prompt length (ctx + 97 r), so no key length "
                       "repeats. fp16 DynamicCache pays cuDNN's SDPA planning at every new key length (the default "
                       "SDPA backend of torch 2.11 on the H200); that is what `generate` users get in eager mode, "
                       "and it is most of DynamicCache's step time. A compiled StaticCache (CUDA graphs) was not "
                       "measured. KVQuant's peak memory here includes a bug fixed after this run (4def698): with "
                       "no fp16 window (R = 0), each layer's empty window was a view of the prompt's concatenation "
                       "and kept an fp16 copy of the prompt alive, 16.0 GiB over 32 layers at 128K. Without it the "
                       "peak would be about 32.9 GiB (48.9 - 16.0; not yet re-measured).",
}


def env_line(name, env):
    return (f"- `{name}`: `{env['command']}`; {env['gpu']} ({env['sms']} SMs, {env['memory_gib']} GiB), torch "
            f"{env['torch']}, triton {env['triton']}, python {env['python']}; {env['date']}; code "
            f"{COMMITS.get(name, '?')}\n")


def _run_order(path):
    """Runs in the order they ran, whatever the shell gave: run34 before run34b before run35 (a run's rows replace
    earlier runs' and the report lists runs in this order)."""
    m = re.match(r"run(\d+)([a-z]*)_", os.path.basename(path))
    return (int(m.group(1)), m.group(2)) if m else (math.inf, os.path.basename(path))


def load(paths):
    runs = []
    for p in sorted(paths, key=_run_order):
        name = os.path.splitext(os.path.basename(p))[0]
        runs.append((name, json.load(open(p))))
    return runs


def decode_report(runs, out):
    rows, checks, diag, envs, qa = [], [], [], [], None
    bw = None
    # each (shape, batch, context) comes whole from the last run (in argument order) that measured it
    latest = {}
    for name, r in runs:
        for x in r.get("rows", []):
            latest[(x["shape"], x["batch"], x["context"])] = name
    for name, r in runs:
        keep = [x for x in r.get("rows", []) if latest[(x["shape"], x["batch"], x["context"])] == name]
        if keep:
            envs.append((name, r["env"]))
            bw = r["copy_bandwidth_gbps"] if bw is None else max(bw, r["copy_bandwidth_gbps"])
        fix = IMPL_FIX.get(name, {})
        for x in keep:
            rows.append({**x, "impl": fix.get(x.get("impl"), x.get("impl")), "run": name,
                         "copy_bandwidth_gbps": r["copy_bandwidth_gbps"]})
        checks += [{**c, "kernel": c["kernel"].replace("kvquant-fields", fix.get("kvquant-fields", "kvquant-fields")),
                    "run": name} for c in r.get("checks", [])
                   if latest.get((c["shape"], c["batch"], c.get("context"))) == name]
        diag += [{**d, "run": name} for d in r.get("diag", [])]
        if not keep and r.get("diag"):
            envs.append((name, r["env"]))
        qa = r.get("quantize_append") or qa
    order = {"llama3-8b": 0, "llama2-7b": 1}
    rows.sort(key=lambda x: (order.get(x["shape"], 2), x["shape"], x["batch"], x["context"]))
    dec = {"gpu": envs[0][1]["gpu"], "copy_bandwidth_gbps": bw, "runs": {n: e for n, e in envs}, "rows": rows,
           "checks": checks, "diag": diag, "quantize_append": qa}
    json.dump(dec, open(os.path.join(out, "gpu_decode.json"), "w"), indent=1)
    md = "# Decode attention per layer on one H200\n\nRuns:\n\n" + "".join(env_line(n, e) for n, e in envs)
    md += "".join(f"\n**Note ({n}).** {RUN_NOTES[n]}\n" for n, _ in envs if n in RUN_NOTES)
    md += (f"\nDevice copy bandwidth (read + write of a 2 GiB copy), measured in each run: up to **{bw} GB/s**. "
           "Latency: `triton.testing.do_bench` median; from run 49 on, of a CUDA-graph replay of the call (every "
           "row, fp16 too; how `generate` runs a decode step), so the host's launch cost is not in it. "
           "GB/s = bytes the kernel must read (fp16: K + V; KVQuant: "
           "every quantized field incl. outliers, scales and q_pos, plus the fp16 sink) / time; bits = that storage "
           "per K/V element, measured from the allocated tensors. Speedup = best fp16 (PyTorch SDPA or our split-K "
           "kernel) / this row. Synthetic quantizers (random sorted codebooks, random per-channel key ranges with "
           "outlier channels), storages filled through `quantize_append`; 1 fp16 sink. `nuqN-1pct` = head-group "
           "value ranges (one value slot per head and token), read by the kernel in the `kernel` column (pairs: the "
           "Gluon kernel, the default in CUDA-graph decode steps, i.e. in `generate`, at head_dim 64 and 128: for "
           "3-bit storage since run 55, 2-bit since run 71, 4-bit since run 77, head_dim 64 since run 92; launched "
           "eagerly the default is natural for 3/4-bit storage and fields for 2-bit at head_dim 128, up to "
           "`kernels.EAGER_PAIRS_MIN_TOKEN_HEADS`; at head_dim 256 pairs in graph steps since run 106 for "
           "token-group values and 4-bit storage, and since run 136 for head-group 2/3-bit storage at every size "
           "(from 100K token-heads of capacity before), and eagerly, as at 64 and 128, up from "
           "`kernels.EAGER_PAIRS_MIN_TOKEN_HEADS` since run 142, with "
           "`natural-run98launch` the natural kernel's launch before run 102); `-tokengroup` = value ranges and 1% "
           "slots over all KV heads of a token (the calibration default), read by the kernel in the `kernel` column "
           "(pairs in graph steps and in large eager steps; eagerly natural below, the default since run 21; tiles "
           "before).\n\n")
    md += ("| shape | context | batch | method | kernel | bits | latency (us) | GB/s | % copy BW | "
           "speedup vs best fp16 | run |\n")
    md += "|---|---|---|---|---|---|---|---|---|---|---|\n"
    for x in rows:
        md += (f"| {x['shape']} | {x['context']:,} | {x['batch']} | {x['method']} | {x['impl']} | {x['bits']} | "
               f"{x['latency_us']:,} | {x['gbps']:,} | {100 * x['bw_fraction']:.1f}% | "
               f"**{x['speedup_vs_best_fp16']}x** | {x['run']} |\n")
    if checks:
        md += ("\nCorrectness on the GPU (relative L2 error vs the float32 PyTorch reference over core.codec, at the "
               "smallest context of each block):\n\n| run | kernel | shape | batch | context | rel. error |\n"
               "|---|---|---|---|---|---|\n")
        for c in checks:
            md += (f"| {c['run']} | {c['kernel']} | {c['shape']} | {c['batch']} | {c['context']} | "
                   f"{c['rel_err']:.2e} |\n")
    if diag:
        md += ("\nLaunch sweeps (128K, nuq3-1%; Llama-3-8B shape and batch 1 unless the row says otherwise); the "
               "fastest configuration is the library default. hi pairs = the removed hi_pairs option (run 15). "
               "lutx = register lookup table + fp16 dequantisation (False: fp32 gathers); max regs "
               "0 = no cap; splits empty = the default split count; an empty row = that kernel's default launch at "
               "the time of the run; reload / wide = the natural kernel's reload and wide_loads options; rel. "
               "error vs the float32 reference:\n\n"
               "| run | shape | batch | kernel | value group | lutx | BT | warps | max regs | prefetch | reload | "
               "wide | hi pairs | splits | value-slot correction | us | GB/s | rel. error |\n" + "|---" * 18 + "|\n")
        for d in diag:
            if "latency_us" not in d:
                continue
            err = f"{d['rel_err']:.1e}" if "rel_err" in d else ""
            md += (f"| {d['run']} | {d.get('shape', 'llama3-8b')} | {d.get('batch', 1)} | {d.get('kernel', 'tiles')} | "
                   f"{d.get('value_group', '')} | {d.get('lutx', '')} | "
                   f"{d.get('block_t', '')} | {d.get('num_warps', '')} | {d.get('maxnreg', '')} | "
                   f"{d.get('prefetch', '')} | {d.get('reload', '')} | {d.get('wide_loads', '')} | "
                   f"{d.get('hi_pairs', '')} | "
                   f"{d.get('num_splits') or ''} | "
                   f"{d.get('value_correction', '')} | {d['latency_us']} | {d['gbps']} | {err} |\n")
    if qa:
        md += (f"\n`quantize_append` (Llama-3-8B shape, {qa['tokens']} tokens, nuq3-1%): {qa['kernel_us']} us = "
               f"{qa['tokens_per_s'] / 1e6:.1f}M tokens/s vs {qa['torch_codec_us'] / 1e3:.0f} ms for the PyTorch "
               f"codec on the same GPU; key-code mismatch {qa['key_code_mismatch']:.1e}, value-code mismatch "
               f"{qa['value_code_mismatch']:.1e}.\n")
    open(os.path.join(out, "gpu_decode.md"), "w").write(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shapes = [s for s in ("llama3-8b", "llama2-7b", "llama32-1b", "gemma3-4b")
                  if any(x["shape"] == s for x in rows)]
        cols = min(len(shapes), 2)
        nrows = math.ceil(len(shapes) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 4.8 * nrows), squeeze=False)
        # colour: the storage (fp16 black); line: the kernel (solid: pairs / SDPA, the fastest of each)
        methods = sorted({x["method"] for x in rows if x["method"] != "fp16"})
        colour = {"fp16": "black", **{m: f"C{i}" for i, m in enumerate(methods)}}
        style = {"sdpa": "-", "splitk": ":", "kvquant-pairs": "-", "kvquant-natural": "--", "kvquant-fields": "-.",
                 "kvquant-tiles": ":", "kvquant-natural-run98launch": (0, (1, 3))}
        # (the natural kernel's pre-run-102 launch stays in the table; the plot shows the kernels that run now)
        curves = sorted({(x["method"], x["impl"]) for x in rows if x["impl"] != "kvquant-natural-run98launch"})
        for ax, shape in zip(axes.flat, shapes):
            for meth in curves:
                pts = sorted((x["context"], x["latency_us"]) for x in rows
                             if x["shape"] == shape and x["batch"] == 1 and (x["method"], x["impl"]) == meth)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                            color=colour[meth[0]], linestyle=style.get(meth[1], "-"),
                            label=f"{meth[0]} ({meth[1]})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{shape}, batch 1, one layer (H200)")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("decode attention latency (us)")
            ax.legend(fontsize=6 if shape == "gemma3-4b" else 7, loc="lower right" if shape == "gemma3-4b" else "best")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "gpu_decode.png"), dpi=110)
    except Exception as e:  # noqa: BLE001
        print("no plot:", e)


def last_with(runs, key, out, json_name):
    """(run name, env, section) of the last run holding a non-empty ``key`` section (written to ``json_name`` with
    its run and env), or None."""
    for name, r in runs[::-1]:
        sec = r.get(key)
        if sec and (key != "generate" or sec.get("rows")):
            json.dump({"env": r["env"], "run": name, **sec}, open(os.path.join(out, json_name), "w"), indent=1)
            return name, r["env"], sec
    return None


def capacity_report(runs, out):
    found = last_with(runs, "capacity", out, "gpu_capacity.json")
    if found:
        name, env, cap = found
        md = "# Capacity: longest context on one H200, Llama-2-7B shape (32 layers, 32 KV heads, d128)\n\n"
        md += "Run:\n\n" + env_line(name, env)
        md += (f"\nBudget = {cap['memory_bytes'] / 2**30:.1f} GiB GPU memory - {cap['weights_bytes'] / 1e9:.1f} GB "
               f"bf16 weights - {cap['reserve_bytes'] / 2**30:.0f} GiB workspace. Bytes/token from the real allocated "
               "LayerStorage (every quantized field and q_pos) x 32 layers.\n\n"
               "| cache | bits | bytes/token | max context | vs fp16 |\n|---|---|---|---|---|\n")
        base = cap["rows"][0]["max_context"]
        for x in cap["rows"]:
            md += (f"| {x['cache']} | {x.get('effective_bits', 16)} | {x['bytes_per_token']:,.0f} | "
                   f"{x['max_context']:,} | {x['max_context'] / base:.2f}x |\n")
        d = cap.get("decode_1m") or {}
        if "error" in d:
            md += f"\n1M-token decode step failed: {d['error']}\n"
        elif d:
            md += (f"\n**A real 1M-token decode step** ({d['context']:,} tokens, {d['cache']}): layer 0 filled through "
                   f"the real `quantize_append` kernel with synthetic keys/values ({d['fill_s_one_layer']} s; a "
                   "1M-token prefill does not fit in one device call), the other 31 layers hold copies of its tensors "
                   f"(real allocations). All 32 layers allocate {d['allocated_gib_all_layers']} GiB "
                   f"(GPU memory in use {d['gpu_memory_used_gib']} GiB, so the bf16 weights fit beside it). Decode "
                   f"attention: {d['layer_latency_us'] / 1e3:.1f} ms per layer, {d['all_layers_attention_ms']:.0f} ms "
                   f"for all 32 layers")
            if "layer_latency_graph_us" in d:
                md += (f" launched eagerly ({d['eager_kernel']} kernel); as `generate` runs a step (CUDA-graph "
                       f"replay, {d['graph_kernel']} kernel): {d['layer_latency_graph_us'] / 1e3:.2f} ms per layer, "
                       f"{d['all_layers_attention_graph_ms']:.0f} ms for all 32 layers (its output differs from the "
                       f"eager kernel's by {d['graph_vs_eager_rel_diff']:.1e}, relative)")
            md += (f"; output finite: {d['finite']}. The fp16 cache of this context would need "
                   f"{32 * 2 * 32 * 128 * 2 * d['context'] / 2**30:.0f} GiB.\n")
        open(os.path.join(out, "gpu_capacity.md"), "w").write(md)


def _generate_table(name, env, gen):
    via_generate = gen.get("via") == "model.generate"
    md = env_line(name, env)
    if name in RUN_NOTES:
        md += f"\n**Note.** {RUN_NOTES[name]}\n"
    if via_generate:
        batch = gen.get("batch", 1)
        md += (f"\nModel: {gen['model']}, {gen['layers']} layers, batch {batch}, prompt of random token ids"
               + (f" (tokens/s: steps per second; each step makes {batch} tokens)" if batch > 1 else "") + "; "
               f"`model.generate` (greedy, {gen['new_tokens']} new tokens, eager: `disable_compile=True`). A "
               "streamer stamps each token after a device synchronisation; step time = median gap between tokens "
               f"(first decode step dropped). The caches run in turn for {gen['rounds']} rounds (the host's speed "
               "drifts during a run); a row reports its faster round, `rounds` lists both. quanto = transformers' "
               "`QuantizedCache` (quanto backend, q_group_size 64, 128-token fp16 residual).\n\n"
               "| context | cache | tokens/s | vs dynamic fp16 | step ms | rounds (ms) | prefill s | peak GiB |\n"
               "|---|---|---|---|---|---|---|---|\n")
    else:
        md += (f"\nModel: {gen['model']}, {gen['layers']} layers, batch 1, prompt of random token ids; "
               f"{gen['new_tokens']} greedy decode steps after the prefill, median step time (the first two "
               "dropped). quanto = transformers' `QuantizedCache` (quanto backend, q_group_size 64, 128-token fp16 "
               "residual).\n\n"
               "| context | cache | tokens/s | vs dynamic fp16 | step ms | prefill s | peak GiB |\n"
               "|---|---|---|---|---|---|---|\n")
    base = {x["context"]: x["tokens_per_s"] for x in gen["rows"] if x.get("cache") == "dynamic" and
            "tokens_per_s" in x}
    for x in gen["rows"]:
        if "error" in x:
            md += f"| {x['context']} | {x['cache']} | error: {x['error'][:120]} | | | | |\n"
            continue
        ratio = f"{x['tokens_per_s'] / base[x['context']]:.2f}x" if x["context"] in base else ""
        mem = x.get("peak_mem_gib", x.get("mem_gib", ""))
        rounds = (" / ".join(str(t) for t in x.get("step_ms_rounds", [])) + " | ") if via_generate else ""
        md += (f"| {x['context']:,} | {x['cache']} | {x['tokens_per_s']} | {ratio} | {x['step_ms']} | {rounds}"
               f"{x['prefill_s']} | {mem} |\n")
    return md


def generate_report(runs, out):
    partial = [(n, r) for n, r in runs if n in PARTIAL_GENERATE and (r.get("generate") or {}).get("rows")]
    # batched runs and other models (generate's --gen-model) get their own sections after the rest
    batched = [(n, r) for n, r in runs if (r.get("generate") or {}).get("batch", 1) > 1
               or (r.get("generate") or {}).get("shape", "llama3-8b") != "llama3-8b"]
    runs = [(n, r) for n, r in runs if n not in PARTIAL_GENERATE and (n, r) not in batched]
    found = last_with(runs, "generate", out, "gpu_generate.json")
    if found:
        name, env, gen = found
        title = ("# End-to-end decode tokens/s of `model.generate` with each cache\n\nRun:\n\n"
                 if gen.get("via") == "model.generate" else
                 "# End-to-end decode tokens/s (model forward loop with each cache)\n\nRun:\n\n")
        md = title + _generate_table(name, env, gen)
        # earlier model.generate runs (batch 1)
        names = [n for n, _ in runs]
        before = [(n, r) for n, r in runs[: names.index(name)] if (r.get("generate") or {}).get("rows")
                  and r["generate"].get("via") == "model.generate"]
        # the two runs before it (noisy host-bound steps: runs read together), then, newest first, each run that
        # measured a (context, cache) none of those shown did
        shown = before[-2:][::-1]
        have = {(y["context"], y["cache"]) for r in [gen, *(r["generate"] for _, r in shown)] for y in r["rows"]}
        for x in before[-3::-1]:
            pairs = {(y["context"], y["cache"]) for y in x[1]["generate"]["rows"]}
            if pairs - have:
                shown.append(x)
                have |= pairs
        shown = list(dict(shown).items())
        data = json.load(open(os.path.join(out, "gpu_generate.json")))
        if shown and gen.get("via") == "model.generate":
            data["earlier"] = []
            for en, er in shown:
                md += "\n## Earlier run\n\n" + _generate_table(en, er["env"], er["generate"])
                data["earlier"].append({"run": en, "env": er["env"], **er["generate"]})
        for pn, pr in partial:
            md += "\n## Partial run\n\n" + _generate_table(pn, pr["env"], pr["generate"])
        data["separate"] = []  # the batched and other-model runs, as their sections below
        for bn, br in batched:
            bg = br["generate"]
            label = bg["model"].removeprefix("random-weight ").removesuffix(" (bf16)")
            head = (f"Batch {bg['batch']}" if bg.get("shape", "llama3-8b") == "llama3-8b" else
                    f"{label}, batch {bg.get('batch', 1)}")
            md += f"\n## {head}\n\n" + _generate_table(bn, br["env"], bg)
            data["separate"].append({"run": bn, "env": br["env"], **bg})
        json.dump(data, open(os.path.join(out, "gpu_generate.json"), "w"), indent=1)
        open(os.path.join(out, "gpu_generate.md"), "w").write(md)


def calibration_report(runs, out):
    found = last_with(runs, "calibration", out, "gpu_calibration.json")
    if found:
        name, env, cal = found
        md = ("# Calibration time on one H200\n\nRun:\n\n" + env_line(name, env) +
              f"\nModel: {cal['model']}; {cal['windows']} windows of {cal['window']} random token ids (time only: the "
              "weights are random). Statistics = one pass that collects the pre-RoPE key ranges, value statistics "
              "and Fisher-weighted histograms (forward + backward for the squared gradients); fit = the weighted "
              "k-means codebooks and outlier thresholds of three quantizers (nuq4, nuq3, nuq2 at 1%).\n\n"
              "| statistics (s) | fit nuq4+3+2 (s) | total (s) | peak GiB |\n|---|---|---|---|\n"
              f"| {cal['statistics_s']} | {cal['fit_s_nuq4_3_2']} | {cal['total_s']} | {cal['peak_mem_gib']} |\n")
        open(os.path.join(out, "gpu_calibration.md"), "w").write(md)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    a = ap.parse_args()
    runs = load(a.runs)
    for n in DECODE_SKIP:
        if n in dict(runs):
            print(f"{n}: not in the decode report: {DECODE_SKIP[n]}")
    kept = [(n, r) for n, r in runs if n not in DECODE_SKIP]
    decode_report([(n, r) for n, r in kept if any(k in x.get("impl", "") for x in r.get("rows", [])
                                                   for k in ("fields", "natural"))
                   or any(d.get("kernel") in ("fields", "natural") for d in r.get("diag", []))] or kept, a.out)
    capacity_report(runs, a.out)
    generate_report(runs, a.out)
    calibration_report(runs, a.out)


if __name__ == "__main__":
    main()
