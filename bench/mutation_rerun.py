"""Re-run the mutants that survived a sampled run (read from its log) against the current tests.
Usage: python bench/mutation_rerun.py <log> <repo copy> <file> <timeout_s> -- <pytest args...>
(docs/methods.md, "Mutation testing (sampled)")."""
import json, subprocess, sys
from pathlib import Path
from mutmut import Context, list_mutations, mutate
log, root, rel, tmo = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cmd = sys.argv[sys.argv.index("--") + 1:]
want = [json.loads(l) for l in open(log) if l.startswith("{")]
want = {(r["line"], r["index"]) for r in want if r["status"] == "survived"}
path = Path(root) / rel
original = path.read_text()
ids = [m for m in list_mutations(Context(source=original, filename=str(path))) if (m.line_number + 1, m.index) in want]
try:
    for mid in ids:
        path.write_text(mutate(Context(source=original, mutation_id=mid, filename=str(path)))[0])
        try:
            rc = subprocess.run(cmd, cwd=root, capture_output=True, timeout=tmo).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(json.dumps(dict(line=mid.line_number + 1, index=mid.index, status="survived" if rc == 0 else "killed")), flush=True)
finally:
    path.write_text(original)
