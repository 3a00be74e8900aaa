"""Engine throughput vs `transformers` generate on the same tiny model, same thread count.

Prints decode tokens/s for both and their ratio at each batch size (1 and 16 by default), our
decode step time, and prefill tokens/s for a 512-token prompt. Decode time is isolated as
time(generate N tokens) - time(generate 1).

    OMP_NUM_THREADS=1 .venv/bin/python bench/engine.py [--arch deepseek_v3|qwen3_moe] [--threads 1]
    python bench/engine.py --device cuda --batches 1,16,64     # on a GPU: bf16 both sides
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
import transformers

from services.engine import Engine, SamplingParams
from services.tools.tiny import make_tiny_model


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ours(engine: Engine, prompts: list[list[int]], new_tokens: int) -> Callable[[], object]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return lambda: engine.generate(prompts, params)


def theirs(model, prompts: list[list[int]], new_tokens: int) -> Callable[[], object]:
    ids = torch.tensor(prompts, device=model.device)

    def run():
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
            )
        if out.is_cuda:
            torch.cuda.synchronize()  # ours ends each step on the host already
        return out

    return run


def decode_rate(make: Callable[[int], Callable[[], object]], batch: int, new: int, repeats: int) -> float:
    t_one = best_of(make(1), repeats)
    t_all = best_of(make(new), repeats)
    return batch * (new - 1) / (t_all - t_one)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="deepseek_v3", choices=["deepseek_v3", "qwen3_moe"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 unless --dtype)")
    ap.add_argument("--dtype", default=None, help="float32 on the CPU, bfloat16 on a GPU by default")
    ap.add_argument("--batches", default="1,16", help="decode batch sizes, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(f"{tmp}/m", args.arch)
        engine = Engine.from_pretrained(
            model_dir,
            device=args.device,
            dtype=dtype,
            max_prefill_tokens=1024,
            max_num_seqs=max(64, *batches),
        )
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        hf = hf.to(args.device).eval()
        vocab = engine.model_config.vocab_size
        g = torch.Generator().manual_seed(0)

        print(
            f"model: tiny {args.arch}, {args.device} {dtype}, threads={torch.get_num_threads()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}"
        )
        print(f"{'metric':<34}{'moeserve':>12}{'transformers':>14}{'ratio':>8}")
        for batch in batches:
            prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=g).tolist()
            ours(engine, prompts, 4)()  # warm-up
            theirs(hf, prompts, 4)()
            a = decode_rate(lambda n, p=prompts: ours(engine, p, n), batch, args.new_tokens, args.repeats)
            b = decode_rate(lambda n, p=prompts: theirs(hf, p, n), batch, args.new_tokens, args.repeats)
            print(f"{f'decode tok/s, batch {batch}':<34}{a:>12.1f}{b:>14.1f}{a / b:>8.2f}")
            print(f"{f'decode step ms, batch {batch}':<34}{1e3 * batch / a:>12.2f}{1e3 * batch / b:>14.2f}")

        prompt = torch.randint(0, vocab, (1, 512), generator=g).tolist()
        a = 512 / best_of(ours(engine, prompt, 1), args.repeats)
        b = 512 / best_of(theirs(hf, prompt, 1), args.repeats)
        print(f"{'prefill tok/s, 512-token prompt':<34}{a:>12.1f}{b:>14.1f}{a / b:>8.2f}")


if __name__ == "__main__":
    main()
