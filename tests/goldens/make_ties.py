#!/usr/bin/env python
"""Golden cases for top-k/top-p filtering of rows with equal logits, made by the original code.

Runs transformers 4.10.2's `top_k_top_p_filtering` (the one rudolph 0.0.1rc1 calls) on CPU with
PyTorch 2.4.1, in the reference environment that `../shared/bench/setup_reference.sh` installs:

    ~/.cache/rudolph-reference/bin/python tests/goldens/make_ties.py tests/goldens/ties

Writes `ties.safetensors` (each row's logits as f16, which is where equal logits come from in
real use, each case's kept-token mask as u8, and the indices `torch.sort(descending=True)` gives
rows that drive its introsort down every branch) and `ties.json` (the cases). Every case is built
so that a cut falls inside a run of equal logits; the script checks that and records, per case,
whether a stable sort would have kept other tokens (most cases would).
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import top_k_top_p_filtering

torch.set_num_threads(1)
rng = np.random.default_rng(2026)


def fp16_gaussian(n, scale):
    return (rng.standard_normal(n) * scale).astype(np.float16)


def rows():
    out = {}
    for n in (5, 16, 17, 33, 100, 1000, 8192, 16384):
        out[f'equal_{n}'] = np.full(n, 0.75, np.float16)
        # a few distinct levels: long runs of equal values everywhere, several tied maxima
        out[f'levels_{n}'] = rng.integers(0, 4, n).astype(np.float16)
        out[f'fp16_{n}'] = fp16_gaussian(n, 0.5)
        # tied maxima above a tail of equal values
        r = np.full(n, -2.0, np.float16)
        r[rng.choice(n, size=max(2, n // 8), replace=False)] = 1.5
        out[f'maxima_{n}'] = r
    return out


def sort_rows():
    """Rows whose sort reaches every branch of the introsort, heapsort fallback included."""
    out = {}
    for n in (17, 40, 257, 1000):
        out[f'organ_pipe_{n}'] = np.concatenate([np.arange(n // 2), np.arange(n - n // 2)[::-1]])
        out[f'sawtooth_{n}'] = np.arange(n) % 7
        out[f'odd_even_{n}'] = np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])
        out[f'three_levels_{n}'] = rng.integers(0, 3, n)
    return {k: v.astype(np.float16) for k, v in out.items()}


def kept(row, top_k, top_p):
    logits = torch.from_numpy(row.astype(np.float32))[None]
    return torch.isfinite(top_k_top_p_filtering(logits.clone(), top_k=top_k, top_p=top_p))[0].numpy()


def stable_kept(row, top_k, top_p):
    """The same filter with a stable sort: what a port without torch's order would keep."""
    x = row.astype(np.float32).copy()
    if top_k > 0:
        kth = np.sort(x)[::-1][min(top_k, len(x)) - 1]
        x[x < kth] = -np.inf
    order = np.argsort(-x, kind='stable')
    p = torch.from_numpy(x[order]).softmax(-1).cumsum(-1).numpy()
    remove = p > top_p
    remove[1:] = remove[:-1].copy()
    remove[0] = False
    x[order[remove]] = -np.inf
    return np.isfinite(x)


def cut_in_tie(row, mask):
    """Does the filter keep some but not all of a run of equal logits?"""
    values = row.astype(np.float32)
    for v in np.unique(values[mask]):
        same = values == v
        if mask[same].any() and not mask[same].all():
            return True
    return False


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    tensors, cases = {}, []
    for name, row in rows().items():
        tensors[f'logits.{name}'] = torch.from_numpy(row)
        for top_k, top_p in [(0, 0.3), (0, 0.5), (0, 0.9), (0, 0.99), (3, 0.5), (8, 0.7), (32, 0.9),
                             (0, 1.0), (5, 1.0)]:
            mask = kept(row, top_k, top_p)
            if not cut_in_tie(row, mask):
                continue
            key = f'kept.{name}.k{top_k}.p{top_p}'
            tensors[key] = torch.from_numpy(mask.astype(np.uint8))
            cases.append({'row': f'logits.{name}', 'kept': key, 'top_k': top_k, 'top_p': top_p,
                          'stable_sort_differs': bool((stable_kept(row, top_k, top_p) != mask).any())})
    orders = []
    for name, row in sort_rows().items():
        tensors[f'sort_input.{name}'] = torch.from_numpy(row)
        idx = torch.sort(torch.from_numpy(row.astype(np.float32)), descending=True)[1]
        tensors[f'sort_order.{name}'] = idx.to(torch.int64)
        orders.append(name)
    assert sum(c['stable_sort_differs'] for c in cases) >= len(cases) // 2, 'too few telling cases'
    save_file(tensors, os.path.join(out_dir, 'ties.safetensors'))
    meta = {'made_by': 'transformers 4.10.2 top_k_top_p_filtering, torch ' + torch.__version__ + ' CPU',
            'cases': cases, 'orders': orders}
    with open(os.path.join(out_dir, 'ties.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    print(f'{len(cases)} cases, {sum(c["stable_sort_differs"] for c in cases)} where a stable sort differs')


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), 'ties'))
