#!/usr/bin/env python3
"""The ORIGINAL RuDOLPH (rudolph 0.0.1rc1) timed on a GPU as it was meant to run: CUDA, fp16
(its FP16Module), the 350M configuration with random weights, `pipelines.generate_codebooks`
with its KV cache and its top-k/top-p sampling (the same 1024 / 0.975 as `rudolph bench`).

Only the original's own package is needed beside PyTorch: the helpers it imports from
`huggingface_hub` (downloads) and `transformers` (`top_k_top_p_filtering`, since removed from
transformers) are stood in for, the latter by a copy of transformers 4.10's code, and the
tokenizer by a prompt of the same length as `rudolph bench`'s (BOS, six ids, EOS, pads).

    python3 bench/gpu_original.py --site DIR [--device cuda] [--config 350m|tiny] \
        --runs 1:2,32:32   # batch:images pairs; one untimed batch of each size first

DIR holds the `rudolph` and `more_itertools` packages (pure Python), e.g. the site-packages of
`../shared/bench/setup_reference.sh`'s virtualenv. Prints one JSON line per run.
"""
import argparse
import json
import os
import sys
import time
import types

os.environ.setdefault('TQDM_DISABLE', '1')
import torch  # noqa: E402


def top_k_top_p_filtering(logits, top_k=0, top_p=1.0, filter_value=-float('Inf'), min_tokens_to_keep=1):
    """transformers 4.10.2's TopKLogitsWarper then TopPLogitsWarper."""
    if top_k > 0:
        top_k = min(max(top_k, min_tokens_to_keep), logits.size(-1))
        remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
        logits = logits.masked_fill(remove, filter_value)
    if 0 <= top_p <= 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative > top_p
        if min_tokens_to_keep > 1:
            sorted_remove[..., :min_tokens_to_keep - 1] = 0
        sorted_remove[..., 1:] = sorted_remove[..., :-1].clone()
        sorted_remove[..., 0] = 0
        remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
        logits = logits.masked_fill(remove, filter_value)
    return logits


def stand_ins():
    hub = types.ModuleType('huggingface_hub')
    hub.hf_hub_url = hub.cached_download = None
    sys.modules['huggingface_hub'] = hub
    tf = types.ModuleType('transformers')
    tf.top_k_top_p_filtering = top_k_top_p_filtering
    sys.modules['transformers'] = tf


class Prompt:
    """The tokenizer's one use in generate_codebooks: the prompt's ids, padded."""

    def __init__(self, vocab):
        self.ids = [i % vocab for i in (2, 513, 331, 743, 124, 293, 130, 3)]

    def encode_text(self, text, text_seq_length):
        return torch.tensor(self.ids + [0] * (text_seq_length - len(self.ids)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--site', required=True)
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--config', choices=['350m', 'tiny'], default='350m')
    ap.add_argument('--fp32', action='store_true', help='skip FP16Module')
    ap.add_argument('--runs', default='1:2,32:32')
    a = ap.parse_args()
    sys.path.insert(0, a.site)
    stand_ins()
    from rudolph import pipelines
    from rudolph.model import MODELS, FP16Module, ruDolphModel

    params = dict(MODELS['350M']['model_params'])
    if a.config == 'tiny':
        params.update(num_layers=2, hidden_size=64, num_attention_heads=4, l_text_seq_length=8,
                      r_text_seq_length=8, image_tokens_per_dim=4, kernel_size=3, last_kernel_size=3)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = ruDolphModel(device=a.device, **params)
    if not a.fp32:
        model = FP16Module(model)
    model = model.eval().to(a.device)
    build = time.perf_counter() - t0
    tok = Prompt(params['vocab_size'])
    top_k = min(1024, params['image_vocab_size'])

    def generate(images, bs):
        codes = pipelines.generate_codebooks('', tok, model, top_k=top_k, top_p=0.975, images_num=images,
                                             bs=bs, seed=0, use_cache=True)
        if a.device.startswith('cuda'):
            torch.cuda.synchronize()
        return codes

    for run in a.runs.split(','):
        bs, images = (int(x) for x in run.split(':'))
        t0 = time.perf_counter()
        generate(bs, bs)
        warmup = time.perf_counter() - t0
        t0 = time.perf_counter()
        codes = generate(images, bs)
        seconds = time.perf_counter() - t0
        print(json.dumps({
            'implementation': 'original', 'task': 'image', 'config': a.config,
            'dtype': 'f32' if a.fp32 else 'f16', 'device': a.device, 'batch_size': bs, 'images': images,
            'seconds': seconds, 'seconds_per_image': seconds / images,
            'tokens_per_second': codes.numel() / seconds, 'warmup_seconds': warmup, 'build_seconds': build,
            'torch': torch.__version__,
        }), flush=True)


if __name__ == '__main__':
    main()
