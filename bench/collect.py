"""Write bench/RESULTS.md: the header below, then each benchmark's bench/results/<name>.md.

    python bench/collect.py        (after any benchmark has rewritten its results/<name>.md)
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["search", "synthesis", "train", "serve", "scale", "estimate"]
HEADER = """# Benchmark results

Each benchmark under `bench/` prints a table, compares against a baseline measured in the same run
(ratios), and writes its latest figures to `bench/results/<name>.json` and its prose to
`bench/results/<name>.md`; this file gathers the prose (`python bench/collect.py`). Machine for
every figure below: 2 CPU cores, 24 GiB, no GPU. No GPU machine was available, so the GPU figures
(train MFU on 1B/8B configs, serve on a larger config, 8B vLLM throughput) are not measured yet;
each section gives the command that measures them.

**Read the ratios with care.** Each section says whether the machine was shared while it ran.
Figures taken while other jobs (test suites, other benchmarks) shared the 2 cores, at load
averages between 7 and 60, are marked; where such a ratio compares two paths timed at different
moments, load changed between them and the ratio reflects that more than the code.
"""


def main() -> None:
    names = ORDER + sorted(p.stem for p in (HERE / "results").glob("*.md") if p.stem not in ORDER)
    parts = [HEADER]
    for name in names:
        path = HERE / "results" / f"{name}.md"
        if path.exists():
            parts.append(path.read_text().strip() + "\n")
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'} ({len(parts) - 1} benchmarks)")


if __name__ == "__main__":
    main()
