"""Sampled mutation testing with mutmut 2.5's mutation operators: list every mutant of a file, run a seeded
random sample of them against a narrow pytest command (one mutant at a time, the file restored after each).
Usage: python bench/mutation_sample.py <repo copy> <file> <n> <seed> <timeout_s> -- <pytest args...>
Run it on a copy of the repository (it rewrites the file it mutates); mutmut comes with `pip install -e '.[bench]'`.
The commands and the measured kill rates: docs/methods.md, "Mutation testing (sampled)"."""
import json, random, subprocess, sys, time
from pathlib import Path
from mutmut import Context, list_mutations, mutate

root, rel, n, seed, tmo = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cmd = sys.argv[sys.argv.index("--") + 1:]
path = Path(root) / rel
original = path.read_text()
ids = list_mutations(Context(source=original, filename=str(path)))
sample = sorted(random.Random(seed).sample(ids, min(n, len(ids))), key=lambda m: m.line_number)
print(f"{rel}: {len(ids)} mutants, running {len(sample)}", flush=True)
results = []
try:
    for mid in sample:
        mutated, count = mutate(Context(source=original, mutation_id=mid, filename=str(path)))
        assert count == 1
        path.write_text(mutated)
        t = time.time()
        try:
            rc = subprocess.run(cmd, cwd=root, capture_output=True, timeout=tmo).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        status = "survived" if rc == 0 else "killed"
        new_line = mutated.splitlines()[mid.line_number]
        results.append(dict(line=mid.line_number + 1, index=mid.index, old=mid.line.strip(), new=new_line.strip(),
                            status=status, rc=rc, s=round(time.time() - t, 1)))
        print(json.dumps(results[-1]), flush=True)
finally:
    path.write_text(original)
killed = sum(r["status"] == "killed" for r in results)
print(f"SUMMARY {rel}: {killed}/{len(results)} killed of a sample of {len(results)} (population {len(ids)})")
