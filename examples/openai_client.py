#!/usr/bin/env python3
"""RuDOLPH through OpenAI's own Python SDK: `rudolph serve` speaks OpenAI's API, so the
official `openai` client draws and captions with it unchanged.

It lists the models, draws a picture (images.generate), checks that it is a PNG of the
model's native size and saves it, captions it (chat.completions, plain and streamed),
streams a drawing with partial pictures when the installed SDK can, and checks that a
size the model cannot draw is a 400 (openai.BadRequestError) naming the size it can.

Run it:
    rudolph serve --port 8080 &                      # or: cargo run --release -- serve
    pip install -r examples/requirements.txt
    python examples/openai_client.py http://127.0.0.1:8080 [--out DIR]

The server's address may come from $RUDOLPH_URL instead, and the key, for a server started
with an API key, from $RUDOLPH_API_KEY. Exits 0 only if every check passed.
"""
import argparse
import base64
import inspect
import os
import struct
import sys
import tempfile

import openai
from openai import OpenAI

PROMPT = "большая красная звезда слева на белом фоне"  # a big red star on the left, white ground


class Failed(Exception):
    pass


def check(ok, message):
    if not ok:
        raise Failed(message)


def png_size(data):
    """(width, height) from a PNG's IHDR chunk, which must come first."""
    check(data[:8] == b"\x89PNG\r\n\x1a\n", "the picture is not a PNG")
    check(data[12:16] == b"IHDR", "the PNG does not start with its IHDR chunk")
    return struct.unpack(">II", data[16:24])


def check_png(b64, native, what):
    data = base64.b64decode(b64)
    w, h = png_size(data)
    check(f"{w}x{h}" == native, f"{what} is {w}x{h}, not the native {native}")
    return data


def image_part(png):
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"type": "image_url", "image_url": {"url": url}}]


def run(client, out):
    # (a) The models: the first one, and the size it draws.
    models = client.models.list().data
    check(models, "GET /v1/models lists no model")
    model = models[0].id
    native = getattr(models[0], "native_size", None)
    check(isinstance(native, str) and "x" in native, f"model {model} has no native_size")
    print(f"ok  models: {model}, draws {native}")

    # (b) A picture, best of two candidates, as base64 PNG.
    result = client.images.generate(
        model=model, prompt=PROMPT, size=native, response_format="b64_json", n=1,
        extra_body={"seed": 7, "candidates": 2},
    )
    check(len(result.data) == 1, f"asked for 1 picture, got {len(result.data)}")
    png = check_png(result.data[0].b64_json, native, "the picture")
    path = os.path.join(out, "rudolph.png")
    with open(path, "wb") as f:
        f.write(png)
    print(f"ok  images.generate: {native} PNG, {len(png)} bytes -> {path}")

    # (c) Two captions of that picture.
    messages = [{"role": "user", "content": image_part(png)}]
    chat = client.chat.completions.create(model=model, messages=messages, n=2, extra_body={"seed": 1})
    captions = [c.message.content for c in chat.choices]
    check(len(captions) == 2 and all(captions), f"expected 2 captions, got {captions!r}")
    print("ok  chat.completions (captions):")
    for c in captions:
        print(f"      {c}")

    # (d) The same, streamed: the deltas of each choice joined.
    texts = {}
    stream = client.chat.completions.create(
        model=model, messages=messages, n=2, stream=True, extra_body={"seed": 1},
    )
    for chunk in stream:
        check(chunk.object == "chat.completion.chunk", f"a chunk of object {chunk.object!r}")
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    check(sorted(texts) == [0, 1] and all(texts.values()), f"streamed captions: {texts!r}")
    print("ok  chat.completions stream=True:")
    for i in sorted(texts):
        print(f"      {texts[i]}")

    # (e) A streamed drawing with partial pictures, where this SDK has it.
    if "partial_images" in inspect.signature(client.images.generate).parameters:
        events = list(client.images.generate(
            model=model, prompt=PROMPT, size=native, stream=True, partial_images=2,
            extra_body={"seed": 7, "candidates": 2},
        ))
        kinds = [e.type for e in events]
        partials = [e for e in events if e.type == "image_generation.partial_image"]
        check(partials, f"no partial_image event in {kinds}")
        check(kinds.count("image_generation.completed") == 1 and kinds[-1] == "image_generation.completed",
              f"expected one completed event, last: {kinds}")
        check([e.partial_image_index for e in partials] == list(range(len(partials))),
              "partial_image_index is not 0, 1, ...")
        for e in events:
            check_png(e.b64_json, native, e.type)
        print(f"ok  images.generate stream=True: {len(partials)} partial pictures, then completed")
    else:
        print(f"--  images.generate stream=True: not in openai {openai.__version__}, skipped")

    # (f) A size the model cannot draw: a 400 naming the one it can.
    try:
        client.images.generate(model=model, prompt=PROMPT, size="1024x1024")
    except openai.BadRequestError as e:
        check(native in str(e), f"the 400 does not name {native}: {e}")
        print(f"ok  size=1024x1024 -> 400: {e.body.get('message') if isinstance(e.body, dict) else e}")
    else:
        raise Failed("size=1024x1024 was accepted")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", default=os.environ.get("RUDOLPH_URL"),
                        help="the server, e.g. http://127.0.0.1:8080 (default: $RUDOLPH_URL)")
    parser.add_argument("--out", help="where to write the picture (default: a temporary folder)")
    args = parser.parse_args()
    if not args.url:
        parser.error("give the server's URL, or set RUDOLPH_URL")
    out = args.out or tempfile.mkdtemp(prefix="rudolph-openai-")
    os.makedirs(out, exist_ok=True)
    client = OpenAI(base_url=args.url.rstrip("/") + "/v1",
                    api_key=os.environ.get("RUDOLPH_API_KEY", "unused"), max_retries=0, timeout=300)
    print(f"openai {openai.__version__} -> {client.base_url}")
    try:
        run(client, out)
    except (Failed, openai.OpenAIError) as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
