"""Caption the images of a dataset that have no caption, with BLIP or Florence-2 (transformers' own classes).

    python caption.py --data data/ --model Salesforce/blip-image-captioning-large --trigger ohwx
    python caption.py --data data/ --model florence-community/Florence-2-large --device cuda:0 --dtype bf16
    python caption.py --data data/ --template "change {control} to {target}"   # edit pairs: an instruction

Which captioner a checkpoint is comes from its config.json (model_type "blip" or "florence2"). Captions go where
data.py reads them: the folder layout's <stem>.txt (an existing one is rewritten in place; a new one goes to
captions/ when the dataset has that folder, else images/<stem>.txt), or the prompt column of metadata.csv / .jsonl
(added if absent; the file is rewritten whole, other columns kept). Every file is written to a temp name and
renamed, after each batch: a run that fails or is stopped midway keeps what it finished, and a rerun captions the
rest. Existing captions are kept unless CaptionConfig.overwrite. Decoding is greedy (do_sample=False; beams as the
checkpoint's generation_config says): the same images give the same captions whatever the batch size.
"""

import csv
import io
import json
import os
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

from atomic import temp_beside
from config import DataConfig, Dtype
from data import IMAGE_EXTS, _by_stem, _captions_of, _dataset_path, _read_text, _rows
from images import DatasetError, open_image
from load import NO_HUB_KERNELS, parse_device, parse_dtype
import quiet

# config.json model_type -> (the transformers class that captions, its processor class, the default task)
CAPTIONERS = {
    "blip": ("BlipForConditionalGeneration", "BlipProcessor", ""),
    "florence2": ("Florence2ForConditionalGeneration", "Florence2Processor", "<MORE_DETAILED_CAPTION>"),
}
TEMPLATE_FIELDS = ("control", "target")


@dataclass
class CaptionConfig:
    """Caption every image of a dataset that lacks a caption (BLIP or Florence-2)."""

    data: str = ""  # required: a dataset folder (images/, control/) or a metadata.csv / .jsonl (train.py's data.path)
    model: str = "Salesforce/blip-image-captioning-large"  # Hub repo id or local folder of a BLIP or Florence-2 model
    # Florence-2: its task token (<MORE_DETAILED_CAPTION> when empty; <CAPTION>, <DETAILED_CAPTION>, <OCR>). BLIP: text
    # the caption continues (conditional captioning, e.g. "a photography of"; it stays in the caption); empty: none.
    task: str = ""
    trigger: str = ""  # put first in every caption, followed by ", " (a LoRA trigger word)
    prefix: str = ""  # written before the caption (after the trigger) as given: include your own space
    suffix: str = ""  # written after the caption as given
    # Edit pairs: caption the target and the control and write template.format(control=..., target=...) (e.g.
    # "change {control} to {target}"); empty: the target's caption alone.
    template: str = ""
    batch_size: int = 8  # images per generate call (a template's two captions of a pair count as two)
    device: str = "cpu"  # a torch device: "cpu", "cuda:0", ...
    dtype: Dtype = "fp32"  # the captioner's weights (bf16 / fp16 on a GPU)
    max_new_tokens: int = 128  # caption length limit (BLIP ends after ~20 tokens; Florence-2's detailed ones run on)
    overwrite: bool = False  # caption the images that have a caption too (default: existing captions are kept)
    allow_outside_paths: bool = False  # metadata may name images outside its folder (DataConfig.allow_outside_paths)


@dataclass
class Captioner:
    """A loaded captioner: kind is a CAPTIONERS key, task the resolved task (Florence-2 token / BLIP text)."""

    kind: str
    model: torch.nn.Module
    processor: object
    task: str


@dataclass
class Item:
    """One image to caption (or keep): where its caption lives and what it says now."""

    key: str  # the stem (folder) or file:line (metadata), for messages
    image: Path
    control: Path | None
    caption: str  # the current caption, stripped ("" when there is none)
    txt: Path | None = None  # folder layout: the caption file to write
    row: dict | None = None  # metadata layout: the row whose "prompt" is set


@dataclass
class Summary:
    written: list[str] = field(default_factory=list)  # caption files (folder) or metadata rows (file:line)
    skipped: int = 0  # images that had a caption, kept
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, why)

    def __str__(self) -> str:
        lines = [f"captions written: {len(self.written)}, kept (already captioned): {self.skipped}, "
                 f"failed: {len(self.failed)}"]
        return "\n  ".join(lines + [f"{image}: {why}" for image, why in self.failed])


# ---------------------------------------------------------------- the captioner


def captioner_kind(path: str) -> str:
    """The CAPTIONERS key of a checkpoint, from its config.json; ValueError for anything that is not a captioner."""
    p = Path(path)
    if p.is_dir():
        file = p / "config.json"
        if not file.is_file():
            what = " (it holds model_index.json: a diffusers pipeline)" if (p / "model_index.json").is_file() else ""
            raise ValueError(f"captioner {path}: no config.json{what}; expected a BLIP or Florence-2 checkpoint "
                             f"folder (config.json, model.safetensors, processor files) or a Hub repo id")
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: not a JSON config ({e})") from None
    elif p.exists():
        raise ValueError(f"captioner {path}: a file; expected a checkpoint folder or a Hub repo id")
    elif path.startswith((".", "/", "~")) or path.count("/") != 1:  # load.py's rule: a Hub id is "org/name"
        raise ValueError(f"captioner folder {path} does not exist (expected a local checkpoint folder or a Hub "
                         f"repo id such as Salesforce/blip-image-captioning-large)")
    else:
        from transformers import PreTrainedConfig

        try:
            config, _ = PreTrainedConfig.get_config_dict(path)
        except OSError as e:
            raise ValueError(f"captioner {path!r}: neither a local folder nor a readable Hub repo ({e})") from None
    kind, names = config.get("model_type"), ", ".join(f"{k} ({v[0]})" for k, v in CAPTIONERS.items())
    if kind not in CAPTIONERS:
        raise ValueError(f"captioner {path}: config.json says model_type {kind!r}, not a captioner; expected "
                         f"model_type {names}")
    cls, archs = CAPTIONERS[kind][0], config.get("architectures") or []
    if config.get("auto_map"):  # microsoft/Florence-2-*: their own modeling code (trust_remote_code), not ours
        raise ValueError(f"captioner {path}: config.json names remote code (auto_map), which is not run here; use "
                         f"a checkpoint of transformers' native {cls} (e.g. florence-community/Florence-2-large)")
    if archs and cls not in archs:
        raise ValueError(f"captioner {path}: a {', '.join(archs)} checkpoint, not {cls} (captioning)")
    return kind


def florence_tasks(processor) -> list[str]:
    """The Florence-2 tasks that take no input and answer plain text (the processor's own tables)."""
    kinds = processor.tasks_answer_post_processing_type
    return [t for t in processor.task_prompts_without_inputs if kinds.get(t) == "pure_text"]


def load_captioner(path: str, device: str = "cpu", dtype: str = "fp32", task: str = "") -> Captioner:
    """The model (eval, on `device` in `dtype`) and its processor; the task checked before the weights load."""
    import transformers

    kind = captioner_kind(path)
    cls, proc_cls, default_task = CAPTIONERS[kind]
    torch_dtype, dev = parse_dtype(dtype, "dtype"), parse_device(device, "device")
    processor = getattr(transformers, proc_cls).from_pretrained(path)
    task = task or default_task
    if kind == "florence2" and task not in florence_tasks(processor):
        raise ValueError(f"task {task!r}: not a Florence-2 captioning task; expected one of "
                         f"{', '.join(florence_tasks(processor))}")
    if kind == "blip" and task.startswith("<") and task.endswith(">"):
        raise ValueError(f"task {task!r} is a Florence-2 task token; BLIP takes the text its caption starts with "
                         f"(e.g. 'a photography of') or none")
    model = getattr(transformers, cls).from_pretrained(path, dtype=torch_dtype, **NO_HUB_KERNELS).to(dev).eval()
    return Captioner(kind, model, processor, task)


def caption_images(captioner: Captioner, images: list, max_new_tokens: int) -> list[str]:
    """One caption per PIL image, one generate call, whitespace collapsed (a caption is one line)."""
    c, n = captioner, len(images)
    text = [c.task] * n if c.task else None  # BLIP: conditional on the text; Florence-2: the task token
    inputs = c.processor(images=images, text=text, return_tensors="pt").to(c.model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(c.model.dtype)
    with torch.inference_mode():
        ids = c.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    texts = c.processor.batch_decode(ids, skip_special_tokens=True)
    if c.kind == "florence2":  # the processor's parsing for the task (pure text: <s>, </s> dropped, stripped)
        texts = [c.processor.post_process_generation(t, task=c.task, image_size=im.size)[c.task]
                 for t, im in zip(texts, images)]
    return [" ".join(t.split()) for t in texts]


# ---------------------------------------------------------------- the dataset, captions present or not


def _folder_items(root: Path, problems: list[str]) -> list[Item]:
    """data.scan_dataset's folder rules (stems, extensions, the three caption places), captions optional."""
    images_dir = root / "images"
    if not images_dir.is_dir():
        problems.append(f"{root}: no images/ folder (expected images/<stem>.png, or a metadata.csv / .jsonl)")
        return []
    images = {s: p for s, p in _by_stem(images_dir, IMAGE_EXTS, problems).items() if not s.endswith("_mask")}
    controls = _by_stem(root / "control", IMAGE_EXTS, problems)
    captions = [_by_stem(d, (".txt",), problems) for d in (images_dir, root / "captions", root)]
    new_dir = root / "captions" if (root / "captions").is_dir() else images_dir
    items = []
    for stem, image in sorted(images.items()):
        where = _captions_of(stem, image, captions, problems)
        if where is None:
            continue
        text = (_read_text(where[0], problems) or "") if where else ""
        items.append(Item(stem, image, controls.get(stem), text.strip(),
                          txt=where[0] if where else new_dir / f"{image.stem}.txt"))
    return items


def _metadata_items(file: Path, cfg: DataConfig, problems: list[str]) -> tuple[list[Item], list[str]]:
    """The rows of a metadata file (data.py's reading and path rules), prompt optional; and its columns."""
    read = _rows(file, problems)
    if read is None:
        return [], []
    rows, columns = read
    items = []
    for where, row in rows:
        if not row.get("image"):
            problems.append(f"{where}: no 'image' cell (columns found: {', '.join(columns) or 'none'})")
            continue
        control = row.get("control", row.get("kontext_images"))
        paths = [_dataset_path(file, v, cfg, where, problems) if v else None for v in (row["image"], control)]
        if paths[0] is None or (control and paths[1] is None):
            continue
        prompt = "" if row.get("prompt") is None else str(row["prompt"]).strip()
        items.append(Item(where, paths[0], paths[1], prompt, row=row))
    return items, columns


def list_dataset(cfg: CaptionConfig) -> tuple[list[Item], Path | None, list[str]]:
    """(items, the metadata file or None, its columns); DatasetError naming every problem at once."""
    root, problems = Path(cfg.data), []
    if not cfg.data or not root.exists():
        raise DatasetError(f"dataset {cfg.data!r} does not exist (expected a folder or a metadata.csv / .jsonl)")
    if root.is_dir():
        meta = [root / n for n in ("metadata.csv", "metadata.jsonl") if (root / n).is_file()]
        if meta and ((root / "images").is_dir() or len(meta) > 1):
            raise DatasetError(f"dataset {cfg.data} holds {', '.join(['images/'] + [m.name for m in meta])}: which "
                               f"one to caption is ambiguous; point --data at the metadata file (e.g. {meta[0]})")
        root = meta[0] if meta else root
    if root.is_dir():
        items, columns = _folder_items(root, problems), []
    else:
        items, columns = _metadata_items(root, DataConfig(path=str(root),
                                                          allow_outside_paths=cfg.allow_outside_paths), problems)
    if not items and not problems:
        problems.append(f"{cfg.data}: no images found")
    if problems:
        raise DatasetError(f"{len(problems)} problem(s) in dataset {cfg.data}:\n  " + "\n  ".join(problems))
    return items, None if root.is_dir() else root, columns


# ---------------------------------------------------------------- writing


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 text to a temp file in the same folder, fsync, then rename: never a half-written caption."""
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_metadata(file: Path, items: list[Item], columns: list[str]) -> None:
    """The whole metadata file again, rows in order, every column kept, "prompt" added if it was missing."""
    rows = [it.row for it in items]
    if file.suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns + ["prompt"] * ("prompt" not in columns), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_text_atomic(file, text)


def template_fields(template: str) -> tuple[str, ...]:
    """The images a template captions, in TEMPLATE_FIELDS order; ValueError for any other field."""
    usage = "; it may use {control} and {target}, e.g. 'change {control} to {target}'"
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"template {template!r}: {e} (a literal brace is written {{{{ or }}}}){usage}") from None
    bad = sorted(names - set(TEMPLATE_FIELDS))
    if bad:
        raise ValueError(f"template {template!r}: unknown field(s) {', '.join('{' + b + '}' for b in bad)}{usage}")
    if template and not names:
        raise ValueError(f"template {template!r}: no field{usage}")
    return tuple(f for f in TEMPLATE_FIELDS if f in names)


def compose(captions: dict[str, str], cfg: CaptionConfig) -> str:
    """The prompt written for one image: [trigger, ]prefix + (template filled | target caption) + suffix."""
    text = cfg.template.format(**captions) if cfg.template else captions["target"]
    text = f"{cfg.prefix}{text}{cfg.suffix}".strip()
    return f"{cfg.trigger}, {text}" if cfg.trigger else text


def check_config(cfg: CaptionConfig) -> None:
    """Every field problem at once, before the dataset is read or a model loads."""
    problems = []
    for name in ("batch_size", "max_new_tokens"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            problems.append(f"{name}: expected an integer >= 1, got {getattr(cfg, name)!r}")
    for check in (lambda: parse_dtype(cfg.dtype, "dtype"), lambda: parse_device(cfg.device, "device"),
                  lambda: template_fields(cfg.template)):
        try:
            check()
        except ValueError as e:
            problems.append(str(e))
    if not cfg.data:
        problems.append("data: required (a dataset folder or metadata.csv / .jsonl)")
    if problems:
        raise ValueError(f"{len(problems)} caption config problem(s):\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------- the run


def caption_dataset(cfg: CaptionConfig, captioner: Captioner | None = None, progress: bool = True) -> Summary:
    """Caption every image of cfg.data that has no caption (every image with cfg.overwrite) and write the captions
    after each batch. `captioner`: already loaded (else cfg.model is loaded, only when something needs a caption).
    An image that does not decode, or a batch whose generate call raises, is counted as failed and the run goes on;
    an empty caption from the model counts as failed too (nothing is written for it)."""
    from tqdm.auto import tqdm

    check_config(cfg)
    roles = template_fields(cfg.template) or ("target",)
    items, meta, columns = list_dataset(cfg)
    todo = [i for i, it in enumerate(items) if cfg.overwrite or not it.caption]
    summary = Summary(skipped=len(items) - len(todo))
    lacking = [str(items[i].image) for i in todo if "control" in roles and items[i].control is None]
    if lacking:
        raise DatasetError(f"template {cfg.template!r} captions the control image, which {len(lacking)} image(s) "
                           f"lack:\n  " + "\n  ".join(lacking[:20]))
    if not todo:
        return summary
    captioner = captioner or load_captioner(cfg.model, cfg.device, cfg.dtype, cfg.task)
    jobs = [(i, role) for i in todo for role in roles]
    got: dict[int, dict[str, str]] = {i: {} for i in todo}
    failed: dict[int, str] = {}
    with tqdm(total=len(jobs), desc="captioning", unit="image", disable=not progress) as bar:
        for start in range(0, len(jobs), cfg.batch_size):
            batch = [(i, role) for i, role in jobs[start:start + cfg.batch_size] if i not in failed]
            opened, images = [], []
            for i, role in batch:
                try:
                    images.append(open_image(items[i].control if role == "control" else items[i].image))
                    opened.append((i, role))
                except DatasetError as e:
                    failed[i] = str(e)
            try:
                texts = caption_images(captioner, images, cfg.max_new_tokens) if images else []
            except Exception as e:  # counted and named in the summary; the other batches go on
                texts = []
                for i, _ in opened:
                    failed[i] = f"captioner failed on its batch: {type(e).__name__}: {e}"
            for (i, role), text in zip(opened, texts):
                if not text:
                    failed[i] = f"the captioner gave an empty caption for the {role} image"
                got[i][role] = text
            done = sorted({i for i, _ in batch if i not in failed and len(got[i]) == len(roles)})
            for i in done:
                it = items[i]
                it.caption = compose(got.pop(i), cfg)
                if meta is None:
                    try:
                        write_text_atomic(it.txt, it.caption)
                    except OSError as e:
                        failed[i] = f"{it.txt}: not written ({e})"
                        continue
                else:
                    it.row["prompt"] = it.caption
                summary.written.append(str(it.txt) if meta is None else it.key)
            if meta is not None and done:
                write_metadata(meta, items, columns)
            bar.update(len(jobs[start:start + cfg.batch_size]))
    summary.failed = [(str(items[i].image), why) for i, why in sorted(failed.items())]
    return summary


def main(argv: list[str] | None = None) -> Summary:
    cfg = tyro.cli(CaptionConfig, args=argv, description=__doc__.splitlines()[0])
    summary = caption_dataset(cfg)
    print(summary)
    return summary


if __name__ == "__main__":
    quiet.install()
    try:
        sys.exit(1 if main().failed else 0)
    except ValueError as e:  # bad flags, a dataset problem, not a captioner: the message, not a traceback
        raise SystemExit(f"caption.py: error: {e}") from None
