"""Training data: a culture's synth partition as tokenized chat, loss on assistant tokens only.

``tokenize_chat`` renders the conversation with the model's own chat template and labels only the
tokens of assistant turns (``-100`` elsewhere), for single- and multi-turn (CLCA) conversations.
``pack_rows`` optionally packs several conversations into one row of at most ``max_seq_len`` tokens,
with position ids restarting per conversation. ``synth_dataset`` streams a culture's synth
partitions (``artifacts.synth_files``) through Ray Data; a trial with few rows
(``train.local_tokenize_rows``) reads them with ``read_synth_batch``, runs the same UDFs in its own
process and hands Ray Train ``dataset_from_columns``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

IGNORE = -100


@lru_cache(maxsize=4)
def get_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    from cm_ray.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(model_path))  # on this node (a reference travels)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _template(tok, messages: list[dict], gen_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


def tokenize_chat(tok, messages: list[dict], max_seq_len: int) -> dict[str, list[int]] | None:
    """Token ids and labels of one conversation; None when no assistant token survives truncation.

    Each assistant turn's span is the text between the template of the conversation up to that turn
    (with the generation prompt) and the template including the turn, so the end-of-turn token is
    learned too. Raises ValueError for a conversation without an assistant turn.
    """
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant message")
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _template(tok, messages[:k], gen_prompt=True)
        full = _template(tok, messages[: k + 1], gen_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError("chat template is not prefix-stable; cannot mask assistant turns")
        ctx = tok(prefix[len(done):], add_special_tokens=False)["input_ids"]
        ans = tok(full[len(prefix):], add_special_tokens=False)["input_ids"]
        ids += ctx + ans
        labels += [IGNORE] * len(ctx) + ans
        done = full
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(x == IGNORE for x in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


def tokenize_batch(batch: dict[str, np.ndarray], model_path: str, max_seq_len: int,
                   system_prompt: str | None = None) -> dict[str, np.ndarray]:
    """Ray Data UDF: chat conversations -> token ids with assistant-only labels.

    Input columns:  messages (list of {role, content}), split (str)
    Output columns: input_ids (list[int]), labels (list[int]), n_tokens (int), split (str)

    ``system_prompt`` is prepended to conversations without a system message (culture-joint).
    Rows left with no assistant token after truncation are dropped.
    """
    tok = get_tokenizer(model_path)
    out: dict[str, list] = {"input_ids": [], "labels": [], "n_tokens": [], "split": []}
    for messages, split in zip(batch["messages"], batch["split"]):
        messages = list(messages)
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}] + messages
        row = tokenize_chat(tok, messages, max_seq_len)
        if row is not None:
            append_token_row(out, row, split)
    return _as_columns(out)


def append_token_row(out: dict[str, list], row: dict, split, **tags) -> None:
    """One tokenized row into the column lists (int32 ids and labels, its length, split, tags)."""
    out["input_ids"].append(np.asarray(row["input_ids"], dtype=np.int32))
    out["labels"].append(np.asarray(row["labels"], dtype=np.int32))
    out["n_tokens"].append(len(row["input_ids"]))
    out["split"].append(str(split))
    for k, v in tags.items():
        out[k].append(v)


def _as_columns(out: dict[str, list]) -> dict[str, np.ndarray]:
    cols = {}
    for k, v in out.items():
        if v and isinstance(v[0], np.ndarray):
            arr = np.empty(len(v), dtype=object)
            arr[:] = v
            cols[k] = arr
        else:
            cols[k] = np.asarray(v)
    return cols


def pack_rows(batch: dict[str, np.ndarray], max_seq_len: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: greedily pack tokenized rows (in order) into rows of <= max_seq_len tokens.

    Input columns:  input_ids, labels, split
    Output columns: input_ids, labels, position_ids (restart at 0 per conversation), n_tokens, split

    Attention is causal over the packed row; flash-attention kernels use the restarting position
    ids to keep conversations apart, SDPA/eager let later ones see earlier ones (labels never cross).
    """
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "n_tokens": [], "split": []}
    cur: dict[str, list] = {}

    def flush():
        if cur.get("input_ids"):
            for k in ("input_ids", "labels", "position_ids"):
                out[k].append(np.asarray(cur[k], dtype=np.int32))
            out["n_tokens"].append(len(cur["input_ids"]))
            out["split"].append(cur["split"])
        cur.clear()

    for ids, labels, split in zip(batch["input_ids"], batch["labels"], batch["split"]):
        if cur and (len(cur["input_ids"]) + len(ids) > max_seq_len or cur["split"] != split):
            flush()
        if not cur:
            cur.update(input_ids=[], labels=[], position_ids=[], split=str(split))
        cur["input_ids"] += list(ids)
        cur["labels"] += list(labels)
        cur["position_ids"] += list(range(len(ids)))
    flush()
    return _as_columns(out)


def collate(batch: dict[str, np.ndarray], pad_id: int, device: Any = "cpu") -> dict[str, Any]:
    """Right-pad a numpy batch of token rows into torch tensors (labels padded with -100)."""
    import torch

    n = len(batch["input_ids"])
    width = max(len(x) for x in batch["input_ids"])
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long) if "position_ids" in batch else None
    for i in range(n):
        L = len(batch["input_ids"][i])
        ids[i, :L] = torch.as_tensor(np.asarray(batch["input_ids"][i], dtype=np.int64))
        labels[i, :L] = torch.as_tensor(np.asarray(batch["labels"][i], dtype=np.int64))
        mask[i, :L] = 1
        if pos is not None:
            pos[i, :L] = torch.as_tensor(np.asarray(batch["position_ids"][i], dtype=np.int64))
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if pos is not None:
        out["position_ids"] = pos
    return {k: v.to(device) for k, v in out.items()}


def synth_dataset(store, paths: list[str]):
    """Ray Dataset of synth rows (columns: messages, split) from the contract's partition files
    (``artifacts.synth_files``: one culture's files for its tasks)."""
    import ray.data

    # Partition columns (culture, task) come from the path; only the chat and split are needed.
    return ray.data.read_parquet(paths, filesystem=store.fs, columns=["messages", "split"],
                                 partitioning=None, override_num_blocks=min(len(paths), 8))


def synth_row_count(store, paths: list[str]) -> int:
    """Rows in these synth partition files, from their Parquet footers (no data read)."""
    import pyarrow.dataset as pads

    return pads.dataset(paths, filesystem=store.fs, format="parquet").count_rows() if paths else 0


def read_synth_batch(store, paths: list[str], with_path: bool = False) -> dict[str, np.ndarray]:
    """The synth rows of ``paths`` in file order as one numpy batch (what a Ray Data UDF is
    given): columns messages, split, and the file's path when ``with_path``."""
    import pyarrow.parquet as pq

    out: dict[str, list] = {"messages": [], "split": []} | ({"path": []} if with_path else {})
    for path in paths:
        table = pq.read_table(path, filesystem=store.fs, columns=["messages", "split"])
        out["messages"] += table.column("messages").to_pylist()
        out["split"] += table.column("split").to_pylist()
        if with_path:
            out["path"] += [path] * table.num_rows
    cols = {k: np.asarray(v) for k, v in out.items() if k != "messages"}
    cols["messages"] = np.empty(len(out["messages"]), dtype=object)
    cols["messages"][:] = out["messages"]
    return cols


def dataset_from_columns(cols: dict[str, np.ndarray], keep: np.ndarray | None = None):
    """A materialized Ray Dataset of token rows built in this process (``keep``: a row mask);
    id/label/position columns become Arrow int32 lists, as the Ray Data tokenizers write them."""
    import pyarrow as pa
    import ray.data

    keep = np.ones(len(next(iter(cols.values()))), dtype=bool) if keep is None else keep
    arrays = {}
    for k, v in cols.items():
        v = v[keep]
        if v.dtype == object and k in ("input_ids", "labels", "position_ids"):
            arrays[k] = pa.array([np.asarray(x, dtype=np.int32) for x in v], type=pa.list_(pa.int32()))
        else:
            arrays[k] = pa.array(v.tolist())
    return ray.data.from_arrow(pa.table(arrays))
