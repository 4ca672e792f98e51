"""The passage corpus shipped with cm_ray for the offline BM25 search backend.

Short factual passages written for this project about social norms, etiquette, values, family,
religion, trust, everyday life and what counts as offensive online, for the demo cultures (GB, CN,
MX) plus a few culture-free ones. One JSON object per line: id, title, url, text, culture
(ISO alpha-2 or null), lang, topic. Point ``search.corpus`` at your own JSONL/Parquet to replace it.
"""
