"""Export on a real model: merge, zip and GGUF, each timed and checked for fidelity.

    .venv/bin/python benchmarks/export_benchmark.py [--model builtin:qwen2.5-coder-0.5b-instruct]
        [--workdir /tmp/finqlora-export-bench] [--json out.json]

1. Adapter: LoRA r=8 on q/k/v/o_proj made with peft on the base, B factors drawn at random
   (seed 0) so the adapter changes the outputs; saved with the tokenizer, as `finqlora train`
   leaves it. (Stands in for a trained adapter: export does not care how B was learned.)
2. Merge (finqlora.export.adapter.merge_adapter) in float16 and float32. Fidelity: logits of the merged
   model vs the unmerged base + adapter (peft) on a finance prompt, in float32.
   Baseline measured in the same run: the same adapter merged into weights that went through
   bitsandbytes NF4 quantize -> dequantize (what merging into a QLoRA-loaded base does); the
   ratio of its error to the float16 merge's error is why finqlora reloads the base unquantized.
3. Zip: package_adapter + verify_adapter_zip time and size.
4. GGUF (finqlora.export.gguf) f16 and q8_0 from the float16 merged folder, loaded back with
   transformers' GGUF loader: logits vs the merged model, argmax agreement, and file size as a
   ratio of the safetensors size.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from finqlora.export.adapter import adapter_from_zip, merge_adapter, package_adapter, verify_adapter_zip  # noqa: E402
from finqlora.export.gguf import export_gguf  # noqa: E402
from finqlora.models.loading import resolve_model  # noqa: E402

PROMPT = "美联储宣布加息25个基点，对A股银行板块和黄金价格的短期影响如何？请给出方向和理由。"


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    return {
        "max_abs_diff": round((reference - other).abs().max().item(), 5),
        "argmax_agreement": round((reference.argmax(-1) == other.argmax(-1)).float().mean().item(), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/finqlora-export-bench"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import bitsandbytes.functional as bnb_functional
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    torch.manual_seed(0)
    base_dir = resolve_model(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    results: dict[str, object] = {"model": args.model, "prompt_tokens": ids.shape[1]}

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(ids).logits.float()

    # 1. adapter
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    run_dir = args.workdir / "run"
    peft_model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    reference = logits(peft_model)
    with peft_model.disable_adapter():
        results["adapter_effect"] = compare(reference, logits(peft_model))
    del peft_model, base

    # 2. merge
    merges = {}
    for dtype in ("float16", "float32"):
        out, wall, cpu = timed(merge_adapter, base_dir, run_dir, args.workdir / f"merged-{dtype}", dtype=dtype)
        merged = AutoModelForCausalLM.from_pretrained(out.output_dir, dtype=torch.float32)
        merges[dtype] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "bytes": out.total_bytes, **compare(reference, logits(merged))}
        del merged
    # Baseline: the same adapter merged into NF4-dequantized weights.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                packed, state = bnb_functional.quantize_4bit(module.weight.data, quant_type="nf4", blocksize=64)
                module.weight.data = bnb_functional.dequantize_4bit(packed, state).float()
    nf4_merged = PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload()
    merges["nf4_dequantized_baseline"] = compare(reference, logits(nf4_merged))
    merges["error_ratio_nf4_vs_fp16"] = round(
        merges["nf4_dequantized_baseline"]["max_abs_diff"] / max(merges["float16"]["max_abs_diff"], 1e-9), 1
    )
    del nf4_merged, base
    results["merge"] = merges

    # 3. zip
    package, wall, _ = timed(package_adapter, run_dir)
    _, verify_wall, _ = timed(verify_adapter_zip, package.zip_path)
    extracted, load_wall, _ = timed(adapter_from_zip, package.zip_path)
    shutil.rmtree(extracted)  # the extraction lives in FINQLORA_HOME/adapters; do not leave it behind
    results["zip"] = {
        "bytes": package.zip_path.stat().st_size,
        "package_s": round(wall, 2),
        "verify_s": round(verify_wall, 2),
        "load_from_zip_s": round(load_wall, 2),
    }

    # 4. GGUF from the float16 merge
    merged_dir = args.workdir / "merged-float16"
    safetensors_bytes = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors"))
    merged_logits = logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32))
    ggufs = {}
    for outtype in ("f16", "q8_0"):
        out, wall, cpu = timed(export_gguf, merged_dir, args.workdir / "gguf" / f"model-{outtype}.gguf", outtype=outtype, progress=False)
        back, load_wall, _ = timed(AutoModelForCausalLM.from_pretrained, out.gguf_path.parent, gguf_file=out.gguf_path.name, dtype=torch.float32)
        ggufs[outtype] = {
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "bytes": out.bytes_written,
            "size_vs_safetensors": round(out.bytes_written / safetensors_bytes, 3),
            "transformers_load_s": round(load_wall, 1),
            **compare(merged_logits, logits(back)),
        }
        del back
    results["gguf"] = ggufs
    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"

    print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
