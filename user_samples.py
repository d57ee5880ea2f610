"""Samples from the user's own inputs during training (train.sample_prompts): a samples.jsonl of edits without
targets, sampled at every validation into validation/samples-<step>.png with the run's SampleConfig, as sample.py
samples (size_mode, guidance, true CFG, steps, step cache; the seed per line or sample.seed + its line index).

samples.jsonl, one edit per line (paths relative to the file's folder, or absolute):
  {"control": "cat.png", "prompt": "make the cat red"}
  {"control": ["person.png", "hat.png"], "prompt": "put the hat on the person", "seed": 7}
  {"prompt": "a red square"}                      (text-to-image: no control, for FLUX.1-Krea-dev runs)
Checked before any model loads. The prompts' embeddings are cached by content beside the training cache
(prompt-<key>.safetensors), so a cached run loads the text encoders for them once.
"""

import hashlib
import json
from pathlib import Path

import torch

from cache import CACHE_VERSION, read_entry, save_atomic, tensor_digest
from config import Config
from encode import encode_prompt
from images import DatasetError, open_image
from load import Components, load_components, model_identity
from sample import NOT_SAMPLE_KWARGS, sample
from validate import tile_grid

KEYS = ("control", "prompt", "seed")


def read_sample_prompts(path: str | Path, background=(255, 255, 255)) -> list[dict]:
    """samples.jsonl as [{"controls": [PIL images], "prompt": str, "seed": int | None, "line": n}], every problem
    (bad JSON, unknown key, missing or unreadable image, empty prompt, non-integer seed) in one ValueError naming
    the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"train.sample_prompts: {path} does not exist (expected a .jsonl file: one "
                         f'{{"control": "a.png", "prompt": "..."}} per line)')
    out, problems = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not JSON ({e})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object with {', '.join(KEYS)}")
            continue
        if unknown := sorted(set(row) - set(KEYS)):
            problems.append(f"{where}: unknown key(s) {unknown}; expected {', '.join(KEYS)}")
        prompt, seed, control = row.get("prompt"), row.get("seed"), row.get("control", [])
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{where}: \"prompt\" must be a non-empty string")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            problems.append(f"{where}: \"seed\" must be an integer, got {seed!r}")
        names = [control] if isinstance(control, str) else control
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            problems.append(f"{where}: \"control\" must be an image path or a list of them")
            continue
        controls = []
        for c in names:
            p = Path(c) if Path(c).is_absolute() else path.parent / c
            try:
                controls.append(open_image(p, background=tuple(background)))
            except DatasetError as e:
                problems.append(f"{where}: {e}")
        out.append({"controls": controls, "prompt": prompt, "seed": seed, "line": n})
    if not out and not problems:
        problems.append(f"{path}: no samples (expected one JSON object per line)")
    if problems:
        raise ValueError("train.sample_prompts:\n  " + "\n  ".join(problems))
    return out


def check_sample_prompts(cfg: Config) -> list[dict]:
    """read_sample_prompts of train.sample_prompts (empty: []), and what the run's conditioning allows: the user's
    samples carry no mask or IP-Adapter image, so runs with a region token or an IP-Adapter are refused."""
    if not cfg.train.sample_prompts:
        return []
    if cfg.train.region_token or cfg.model.ip_adapter.path:
        raise ValueError("train.sample_prompts: not supported with train.region_token or model.ip_adapter (its "
                         "lines carry no mask or IP-Adapter image); sample the result with sample.py instead")
    return read_sample_prompts(cfg.train.sample_prompts, cfg.data.background)


def prompt_embeddings(prompts: list[str], cfg: Config, cache_dir: Path, log=print) -> dict[str, dict]:
    """{prompt: {"prompt_embeds" [L, D], "pooled_prompt_embeds" [P]}} at sample.max_sequence_length, each read from
    <cache_dir>/prompt-<key>.safetensors (key: the prompt, the text encoders' identity, the length) or encoded with
    the text encoders, loaded only then and freed on return."""
    ident = "|".join(model_identity(cfg.model, getattr(cfg.model, n), n) for n in ("clip", "t5"))
    out, todo = {}, []
    for p in dict.fromkeys(prompts):
        key = hashlib.sha256(f"{CACHE_VERSION}\x00prompt\x00{ident}\x00{cfg.sample.max_sequence_length}\x00{p}"
                             .encode()).hexdigest()[:32]
        file = Path(cache_dir) / f"prompt-{key}.safetensors"
        entry = read_entry(file, file.stem, ("prompt_embeds", "pooled_prompt_embeds"))
        if entry is None:
            todo.append((p, file))
        else:
            out[p] = entry
    if todo:
        log(f"train.sample_prompts: encoding {len(todo)} prompt(s)")
        c = load_components(cfg.model, which=("clip", "t5"))
        for p, file in todo:
            embeds, pooled, _ = encode_prompt(c.clip, c.clip_tokenizer, c.t5, c.t5_tokenizer, p,
                                              max_sequence_length=cfg.sample.max_sequence_length, device="cpu")
            out[p] = {"prompt_embeds": embeds[0].cpu(), "pooled_prompt_embeds": pooled[0].cpu()}
            save_atomic(out[p], file, {"key": file.stem, "sha256": tensor_digest(out[p])})
        del c
    return out


def user_sample_inputs(cfg: Config, cache_dir: Path, log=print) -> tuple[list[dict], dict]:
    """(the checked samples.jsonl lines, the prompt embeddings incl. sample.negative_prompt's with true CFG), or
    ([], {}) without train.sample_prompts. Called before the transformer loads (the text encoders come and go)."""
    rows = check_sample_prompts(cfg)
    if not rows:
        return [], {}
    sc = cfg.sample
    negative = [sc.negative_prompt] if sc.true_cfg_scale > 1 and sc.negative_prompt is not None else []
    return rows, prompt_embeddings([r["prompt"] for r in rows] + negative, cfg, cache_dir, log)


@torch.no_grad()
def sample_user_prompts(transformer, vae, rows: list[dict], embeds: dict, cfg: Config, step: int,
                        out_dir: Path) -> Path:
    """Each line sampled as sample.py would (the run's SampleConfig: every field that is a sample() keyword, the
    line's seed or sample.seed + its index), saved as one PNG with a row per line: control(s) | sample."""
    was = transformer.training
    transformer.eval()
    sc = cfg.sample
    kw = {k: v for k, v in vars(sc).items() if k not in NOT_SAMPLE_KWARGS + ("negative_prompt",
                                                                             "max_sequence_length")}
    neg = embeds.get(sc.negative_prompt) if kw["true_cfg_scale"] > 1 else None
    rows_out = []
    for i, r in enumerate(rows):
        e = embeds[r["prompt"]]
        res = sample(Components(vae=vae, transformer=transformer), r["controls"] or None, None,
                     prompt_embeds=e["prompt_embeds"][None], pooled_prompt_embeds=e["pooled_prompt_embeds"][None],
                     negative_prompt_embeds=None if neg is None else neg["prompt_embeds"][None],
                     negative_pooled_prompt_embeds=None if neg is None else neg["pooled_prompt_embeds"][None],
                     generator=torch.Generator().manual_seed(sc.seed + i if r["seed"] is None else r["seed"]),
                     progress=False, **kw)
        rows_out.append(r["controls"] + [res.images[0]])
    transformer.train(was)
    path = out_dir / "validation" / f"samples-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tile_grid(rows_out).save(path)
    return path
