"""python benchmarks/results/fm_small_ft/stage_diagnosis.py (from the repository root)

Which stage helps or hurts: the calibration grid (n 500, train images, seed 0) of the base LT small generator,
the full-data fine-tune, and the fine-tuned stage 1 with the base stage 2."""
import copy, json, sys
import torch
import dkgm_aug
from dkgm_aug.calibrate import calibrate
from dkgm_aug.data import load_dataset
from dkgm_aug.label_filter import load_evaluator
torch.set_num_threads(1)
base = dkgm_aug.load('benchmarks/results/lt_converged_rho100_gpu/fashion-mnist-lt100-fit-small.safetensors')
ft = dkgm_aug.load('benchmarks/results/fm_small_ft/fashion-mnist-small-ft.safetensors')
mix = copy.deepcopy(ft)
mix.stage2.load_state_dict(base.stage2.state_dict())
train, ev = load_dataset("fashion-mnist", split="train"), load_evaluator("fashion-mnist-evaluator")
out = {}
for name, m in (("base (LT fit split)", base), ("fine-tuned, both stages", ft), ("fine-tuned stage 1 + base stage 2", mix)):
    rec = calibrate(m, train, ev, n=500, seed=0, alphas=(0.25, 0.5), steps=(4, 6))
    out[name] = rec
    print(name, "real", rec["real"]["label_preservation"], round(rec["real"]["sharpness"], 4), "chosen", rec["alpha"], rec["steps"], rec["labels_kept"], flush=True)
    for r in rec["grid"]:
        print("   ", r["alpha"], r["steps"], round(r["sharpness"], 4), round(r["frechet_distance"], 2), r["label_preservation"], flush=True)
    if name.startswith("fine-tuned stage 1 +"):
        m.save('benchmarks/results/fm_small_ft/fashion-mnist-small-ft-mix.safetensors')
json.dump({k: dict(real=v["real"], grid=v["grid"], alpha=v["alpha"], steps=v["steps"]) for k, v in out.items()},
          open('benchmarks/results/fm_small_ft/stage_diagnosis.json', 'w'), indent=1)
