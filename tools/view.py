"""`trace-view`: a run's rollout trees as pages a person can open (issue 24).

    trace-view runs/NAME [runs/OTHER] [--out DIR] [--serve [--port 8765]]

Reads the run's tree dumps (`runs/NAME/trees/step_XXXXX.jsonl.gz`, `trainer.dumps`) one step at a time (a run is
never loaded whole) and writes a static site: `index.html` (every step with its summary: prompts, leaves, mixed
prompts, continuations) and one page a step, `step_XXXXX.html`, holding that step's trees. Given a second run, each
step's page shows the two runs side by side (GRPO's groups next to TRACE's trees, say), steps matched by number.
Pages need no server and load nothing from outside (a page opened from disk cannot read other files, so each
carries its own step's data); `--serve` serves the folder on loopback (stdlib `http.server`) for a remote machine
over an SSH tunnel. Default output: `runs/NAME/view/`.

On a step's page each prompt is a tree: a circle a turn, laid out by depth; its colour the node's value (red 0 ->
green 1; a leaf: its reward), its size the leaves under it, a ring on expanded anchors (continuations were placed
there). Clicking a node shows its turn (action, observation), its kind and round, V(H) predicted at allocation time
against the value that followed, its advantages and whether it was trained. Beside the trees: per prompt its bare
rollouts and continuations, mixed or not, and the step's predictor calibration (Brier score over the nodes with a
prediction and a value).

Every text on the pages is model- or corpus-written: the data is embedded as JSON with `<`, `>` and `&` escaped, and
the page's script puts text into the DOM only as text (`textContent`), never as markup.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer.dumps import DumpError, read_dump  # noqa: E402


def _finite(x: Any) -> Any:
    """`x` with every non-finite float (NaN, inf: not JSON, JSON.parse refuses them) as None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _json_for_html(data: Any) -> str:
    """JSON that is safe inside a <script type="application/json"> element: no `<`, `>` or `&` left raw, and no
    NaN (a page whose data does not parse would show nothing)."""
    text = json.dumps(_finite(data), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def tree_counts(tree: dict[str, Any]) -> dict[str, Any]:
    """One tree's scored leaves, successes among them, whether it is mixed, its bare rollouts (stage 1's first turns)
    and continuations (turns started at an expanded anchor by stage 2). The page shows them per tree (`counts`, set
    by `build`) and `step_summary` adds them up: one definition for both."""
    nodes = tree["nodes"]
    rewards = [x["reward"] for x in nodes if not x["children"] and x["reward"] is not None]
    wins = sum(r >= 0.5 for r in rewards)
    return {
        "leaves": len(rewards),
        "wins": wins,
        "mixed": 0 < wins < len(rewards),
        "bare": sum(1 for x in nodes[1:] if x["parent"] == 0 and x["info"].get("round") == 0),
        "continuations": sum(
            1 for x in nodes[1:] if (x["info"].get("round") or 0) >= 1 and nodes[x["parent"]]["expanded"]
        ),
    }


def step_summary(trees: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step: prompts, and the sums of `tree_counts` (leaves, mixed prompts, bare rollouts, continuations), and
    the predictor's Brier score (V(H) predicted vs the value that followed)."""
    counts = [tree_counts(t) for t in trees]
    pairs = [(x["predicted"], x["value"]) for t in trees for x in t["nodes"]]
    sq = [(p - v) ** 2 for p, v in pairs if p is not None and v is not None]
    return {
        "prompts": len(trees),
        "leaves": sum(c["leaves"] for c in counts),
        "mixed": sum(c["mixed"] for c in counts),
        "bare": sum(c["bare"] for c in counts),
        "continuations": sum(c["continuations"] for c in counts),
        "brier": sum(sq) / len(sq) if sq else None,
    }


def build(runs: list[Path], out: Path) -> list[int]:
    """Write the site for `runs` (one, or two side by side) into `out`; returns the steps written."""
    # .jsonl too: an older, uncompressed dump gets read_dump's error saying so, not "no dumps"; a file named
    # otherwise (step_final.jsonl.gz, a .tmp being written) is not a step's dump
    named = re.compile(r"step_(\d{5,})\.jsonl(\.gz)?")  # step_{step:05d}: six digits from step 100,000
    dumps = [
        {int(m.group(1)): p for p in sorted((r / "trees").glob("step_*")) if (m := named.fullmatch(p.name))}
        for r in runs
    ]
    for run, files in zip(runs, dumps, strict=True):
        if not files:
            raise DumpError(f"{run / 'trees'}: no tree dumps; run trace-train with run.save_trees = true")
    steps = sorted(set(dumps[0]).union(*dumps[1:]))
    out.mkdir(parents=True, exist_ok=True)
    index = []
    errors: list[str] = []
    for step in steps:
        panels = []
        for run, files in zip(runs, dumps, strict=True):
            if step not in files:
                panels.append({"run": run.name, "missing": True, "trees": [], "summary": None})
                continue
            try:  # one step of one run in memory at a time
                header, trees = read_dump(files[step])
                for t in trees:
                    t["counts"] = tree_counts(t)
                summary = step_summary(trees)
            except (DumpError, KeyError, TypeError, ValueError) as e:  # a run killed mid-dump: the other steps show
                why = (
                    str(e) if isinstance(e, DumpError) else f"{files[step]}: not a tree dump ({type(e).__name__}: {e})"
                )
                errors.append(why)
                panels.append({"run": run.name, "missing": True, "error": why, "trees": [], "summary": None})
                continue
            panels.append({"run": run.name, "header": header, "trees": trees, "summary": summary})
        (out / f"step_{step:05d}.html").write_text(_page(step, steps, panels))
        index.append({"step": step, "panels": [{"run": p["run"], "summary": p["summary"]} for p in panels]})
        del panels
    if len(errors) == sum(len(f) for f in dumps):  # nothing readable: the reason, not an empty site
        raise DumpError(errors[0])
    for why in errors:
        print(f"trace-view: skipped {why}", file=sys.stderr)
    (out / "index.html").write_text(_index(runs, index))
    return steps


def _index(runs: list[Path], rows: list[dict[str, Any]]) -> str:
    data = {"runs": [r.name for r in runs], "rows": rows}
    return _HTML.format(title="trace-view", data=_json_for_html({"kind": "index", **data}), script=_INDEX_JS)


def _page(step: int, steps: list[int], panels: list[dict[str, Any]]) -> str:
    data = {"kind": "step", "step": step, "steps": steps, "panels": panels}
    return _HTML.format(title=f"trace-view: step {step}", data=_json_for_html(data), script=_STEP_JS)


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 0; color: #222; }}
header {{ padding: 8px 16px; background: #f4f4f4; border-bottom: 1px solid #ddd; }}
main {{ display: flex; gap: 12px; padding: 12px; }}
.panel {{ flex: 1; min-width: 0; }}
.tree {{ border: 1px solid #ddd; margin: 6px 0; padding: 4px; }}
.tree h3 {{ font-size: 13px; margin: 2px 4px; font-weight: 600; }}
#detail {{ position: sticky; top: 0; width: 36%; max-height: 100vh; overflow: auto; border-left: 1px solid #ddd;
  padding: 8px; white-space: pre-wrap; font-size: 12px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: right; }}
circle {{ cursor: pointer; stroke: #333; stroke-width: 0.5; }} circle.anchor {{ stroke: #1a4fd6; stroke-width: 3; }}
</style></head>
<body><script type="application/json" id="data">{data}</script>
<header id="top"></header><main id="main"></main>
<script>{script}</script></body></html>
"""

_COMMON_JS = r"""
const DATA = JSON.parse(document.getElementById('data').textContent);
function el(tag, attrs, text) {  // every text goes in as text, never as markup
  const e = tag.startsWith('svg:') ? document.createElementNS('http://www.w3.org/2000/svg', tag.slice(4))
                                   : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
const fmt = (x) => (x === null || x === undefined) ? '-'
  : (typeof x === 'number' && !Number.isInteger(x) ? x.toFixed(3) : String(x));
"""

_INDEX_JS = (
    _COMMON_JS
    + r"""
document.getElementById('top').appendChild(el('h2', {}, 'trace-view: ' + DATA.runs.join(' vs ')));
const table = el('table', {id: 'steps'});
const head = el('tr');
['step'].concat(...DATA.runs.map(r => ['prompts', 'leaves', 'mixed', 'bare', 'continuations', 'brier']
  .map(c => r + ': ' + c))).forEach(c => head.appendChild(el('th', {}, c)));
table.appendChild(head);
for (const row of DATA.rows) {
  const tr = el('tr');
  const td = el('td'); const a = el('a', {href: 'step_' + String(row.step).padStart(5, '0') + '.html'}, row.step);
  td.appendChild(a); tr.appendChild(td);
  for (const p of row.panels) for (const c of ['prompts', 'leaves', 'mixed', 'bare', 'continuations', 'brier'])
    tr.appendChild(el('td', {}, p.summary ? fmt(p.summary[c]) : 'n/a'));
  table.appendChild(tr);
}
document.getElementById('main').appendChild(table);
"""
)

_STEP_JS = (
    _COMMON_JS
    + r"""
const bar = document.getElementById('top');  // not `top`: window.top
bar.appendChild(el('a', {href: 'index.html'}, 'all steps'));
const i = DATA.steps.indexOf(DATA.step);
if (i > 0) { bar.appendChild(el('span', {}, '  ')); bar.appendChild(el('a', {href: 'step_' + String(DATA.steps[i - 1]).padStart(5, '0') + '.html', id: 'prev'}, '< step ' + DATA.steps[i - 1])); }
if (i < DATA.steps.length - 1) { bar.appendChild(el('span', {}, '  ')); bar.appendChild(el('a', {href: 'step_' + String(DATA.steps[i + 1]).padStart(5, '0') + '.html', id: 'next'}, 'step ' + DATA.steps[i + 1] + ' >')); }
bar.appendChild(el('h2', {}, 'step ' + DATA.step));
const main = document.getElementById('main');
const detail = el('div', {id: 'detail'}, 'click a node to read its turn');
function colour(v) { if (v === null || v === undefined) return '#bbb';
  const r = Math.round(220 * (1 - v) + 30), g = Math.round(180 * v + 40); return `rgb(${r},${g},70)`; }
function show(tree, n) {
  detail.textContent = '';
  const lines = [['prompt', tree.prompt_id], ['node', n.node_id], ['kind', n.action_kind], ['round', n.info.round],
    ['depth', n.depth], ['status', n.status], ['reward', n.reward], ['V(H) predicted', n.predicted],
    ['value (what followed)', n.value], ['leaves under it', n.n_leaves], ['outcome advantage', n.adv_outcome],
    ['process advantage', n.adv_process], ['trained', n.trained], ['expanded anchor', n.expanded]];
  if (n.entropy !== undefined && n.entropy !== null) lines.push(['entropy of its first tokens', n.entropy]);
  const t = el('table', {id: 'node-facts'});
  for (const [k, v] of lines) { const tr = el('tr'); tr.appendChild(el('th', {}, k)); tr.appendChild(el('td', {}, fmt(v))); t.appendChild(tr); }
  detail.appendChild(t);
  detail.appendChild(el('h4', {}, n.parent === null ? 'question' : 'action'));
  detail.appendChild(el('div', {id: 'node-action'}, n.parent === null ? tree.question : n.action));
  if (n.observation) { detail.appendChild(el('h4', {}, 'observation')); detail.appendChild(el('div', {id: 'node-observation'}, n.observation)); }
  detail.appendChild(el('h4', {}, 'gold answers')); detail.appendChild(el('div', {}, tree.golden_answers.join(' | ')));
}
function drawTree(tree, panelIndex, treeIndex) {
  const box = el('div', {class: 'tree'});
  const nodes = tree.nodes;
  const c = tree.counts;  // tools/view.py tree_counts
  box.appendChild(el('h3', {}, `${tree.prompt_id}: ${c.bare} bare, ${c.continuations} continuations, ${c.mixed ? 'mixed' : 'not mixed'} (${c.wins}/${c.leaves})`));
  box.appendChild(el('div', {class: 'question'}, tree.question));
  let row = 0; const y = {};
  (function place(id) { const n = nodes[id]; if (!n.children.length) { y[id] = row++; return; }
    n.children.forEach(place); y[id] = (y[n.children[0]] + y[n.children[n.children.length - 1]]) / 2; })(0);
  const W = 44, H = 18, depth = Math.max(...nodes.map(n => n.depth));
  const svg = el('svg:svg', {width: (depth + 1) * W + 40, height: Math.max(row, 1) * H + 10});
  for (const n of nodes) if (n.parent !== null)
    svg.appendChild(el('svg:line', {x1: 20 + nodes[n.parent].depth * W, y1: 10 + y[n.parent] * H, x2: 20 + n.depth * W, y2: 10 + y[n.node_id] * H, stroke: '#999'}));
  for (const n of nodes) {
    const v = n.children.length ? n.value : (n.reward !== null ? n.reward : n.value);
    const c = el('svg:circle', {cx: 20 + n.depth * W, cy: 10 + y[n.node_id] * H, r: 3 + 2 * Math.sqrt(Math.max(n.n_leaves, 1)),
      fill: colour(v), class: n.expanded ? 'anchor node' : 'node', 'data-node': n.node_id, 'data-tree': `${panelIndex}-${treeIndex}`});
    c.appendChild(el('svg:title', {}, `${n.action_kind} ${fmt(v)}`));
    c.addEventListener('click', () => show(tree, n));
    svg.appendChild(c);
  }
  box.appendChild(svg);
  return box;
}
DATA.panels.forEach((p, pi) => {
  const panel = el('div', {class: 'panel'});
  panel.appendChild(el('h3', {}, p.run + (p.error ? ': unreadable dump (' + p.error + ')' : p.missing ? ': no dump for this step' : '')));
  if (p.summary) {
    const s = p.summary;
    panel.appendChild(el('div', {class: 'summary'}, `${s.prompts} prompts, ${s.leaves} leaves, ${s.mixed} mixed, ${s.bare} bare rollouts, ${s.continuations} continuations, predictor Brier ${fmt(s.brier)}`));
  }
  p.trees.forEach((t, ti) => panel.appendChild(drawTree(t, pi, ti)));
  main.appendChild(panel);
});
main.appendChild(detail);
"""
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="trace-view", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="+", type=Path, help="one run folder, or two to show side by side")
    ap.add_argument("--out", type=Path, default=None, help="where the pages go (default: the first run's view/)")
    ap.add_argument("--serve", action="store_true", help="serve the pages on 127.0.0.1 after writing them")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args(argv)
    if len(args.runs) > 2:
        ap.error("one run, or two side by side")
    if not 0 <= args.port <= 65535:
        ap.error(f"--port must be in [0, 65535], got {args.port}")
    for r in args.runs:
        if not r.is_dir():
            ap.error(f"{r}: not a run folder")
    out = args.out or args.runs[0] / "view"
    if out.exists() and not out.is_dir():
        ap.error(f"--out {out} is a file: give a folder for the pages")
    try:
        steps = build(args.runs, out)
    except DumpError as e:
        print(f"trace-view: {e}", file=sys.stderr)
        return 2
    print(f"trace-view: {len(steps)} steps -> {out / 'index.html'}")
    if args.serve:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
        try:
            srv = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler)
        except OSError as e:  # the port in use, say
            print(f"trace-view: cannot serve on 127.0.0.1:{args.port}: {e}; the pages are in {out}", file=sys.stderr)
            return 2
        with srv:
            print(f"serving http://127.0.0.1:{srv.server_address[1]}/ (Ctrl-C stops)")
            try:
                srv.serve_forever()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
