"""A static HTML dashboard of `analyse` records: no server, no network, opens from the file system.

DIR/index.html                 the runs, with the full and consensus ensembles' metrics
DIR/<run>/index.html           every feature of the run in one table, sorted and filtered in the page
                               (frequency, stability, consensus, member) by a small inline script
DIR/<run>/features/f<id>.html  one page per feature: top contexts as highlighted text (shade = the
                               feature's activation on each token), histogram, logit effects, matches
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from saeens.io.files import atomic_write_text

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}td.l,th.l{text-align:left}
th[data-key]{cursor:pointer;text-decoration:underline dotted}.ctx{font-family:monospace;white-space:pre-wrap;
margin:4px 0;padding:4px;border:1px solid #eee}.ctx .focus{outline:2px solid #c40;font-weight:bold}
.meta{color:#777;font-size:12px}.bar{fill:#e8772e}.filters label{margin-right:1em}
.cols{display:flex;gap:3em;flex-wrap:wrap}.snip{font-family:monospace;white-space:pre;text-align:left}
""" + "".join(f".a{i}{{background:rgba(232,119,46,{i / 10:.1f})}}" for i in range(1, 11)) + "\n"

HEAD = '<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><link rel="icon" href="data:,">' \
       '<link rel="stylesheet" href="{css}"></head><body>'

SCRIPT = """<script>
(function(){
  var body=document.querySelector('#features tbody'), rows=Array.prototype.slice.call(body.rows);
  var f={member:document.getElementById('member'),cons:document.getElementById('mincons'),
         stab:document.getElementById('minstab'),freq:document.getElementById('minfreq'),
         text:document.getElementById('text')};
  function num(r,k){var v=r.dataset[k];return v===''?-1:parseFloat(v);}
  function apply(){
    var n=0, m=f.member.value, c=parseFloat(f.cons.value)||0, s=parseFloat(f.stab.value)||0,
        q=parseFloat(f.freq.value)||0, t=f.text.value.toLowerCase();
    rows.forEach(function(r){
      var ok=(m===''||r.dataset.member===m)&&num(r,'consensus')>=c&&(s<=0||num(r,'stability')>=s)
             &&num(r,'frequency')>=q&&(t===''||r.textContent.toLowerCase().indexOf(t)>=0);
      r.style.display=ok?'':'none'; if(ok)n++;
    });
    document.getElementById('shown').textContent=n;
  }
  var dir={};
  document.querySelectorAll('th[data-key]').forEach(function(th){
    th.addEventListener('click',function(){
      var k=th.dataset.key; dir[k]=-(dir[k]||1);
      rows.sort(function(a,b){return dir[k]*(num(a,k)-num(b,k));});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
  Object.keys(f).forEach(function(k){['input','change'].forEach(function(e){f[k].addEventListener(e,apply);});});
  apply();
})();
</script>"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def feature_name(rec: dict[str, Any], feat: dict[str, Any]) -> str:
    """m<member>.<latent> (boosting: s<stage>.<latent>)."""
    return f"{rec['role'][0]}{feat[rec['role']]}.{feat['latent']}"


def _token_spans(ctx: dict[str, Any], max_act: float) -> str:
    spans = []
    for i, (tok, a) in enumerate(zip(ctx["tokens"], ctx["acts"])):
        level = min(10, max(1, int(round(10 * a / max_act)))) if a > 0 and max_act > 0 else 0
        cls = " ".join(c for c in (f"a{level}" if level else "", "focus" if i == ctx["focus"] else "") if c)
        text = _e(tok.replace("\n", "\u21b5"))
        attrs = (f' class="{cls}"' if cls else "") + (f' title="{a:.3g}"' if a > 0 else "")
        spans.append(f"<span{attrs}>{text}</span>" if attrs else text)
    return "".join(spans)


def _histogram(counts: list[int], lo: int, edges: list[float]) -> str:
    """Bars of bins lo .. lo + len(counts) (the non-empty range) as inline SVG."""
    if not counts:
        return "<p>never fires on these tokens</p>"
    hi = lo + len(counts)
    top, w, h = max(counts), 8, 80
    bars = "".join(f'<rect class="bar" x="{(i - lo) * w}" y="{h - h * c / top:.1f}" width="{w - 1}" height="{h * c / top:.1f}">'
                   f"<title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): {c}</title></rect>" for i, c in enumerate(counts, lo))
    return (f'<svg class="hist" width="{(hi - lo) * w}" height="{h}" role="img">{bars}</svg>'
            f'<div class="meta">activation {edges[lo]:.3g} .. {edges[hi]:.3g} (log bins), {sum(counts)} tokens</div>')


def feature_page(rec: dict[str, Any], feat: dict[str, Any], shown: set[int]) -> str:
    role, name = rec["role"], feature_name(rec, feat)
    out = [HEAD.format(title=_e(f"{rec['name']} {name}"), css="../../style.css"),
           f'<p><a href="../index.html">{_e(rec["name"])}: all features</a></p><h1>{_e(name)}</h1>',
           f'<p>{role} {feat[role]}, latent {feat["latent"]} (feature {feat["id"]} of {rec["n_features"]}); '
           f'fires on {feat["frequency"]:.3%} of {rec["n_tokens"]} {rec["split"]} tokens, mean {_fmt(feat["mean_act"])} '
           f'when firing, max {_fmt(feat["max_act"])}; found by {feat["consensus"]} of {rec["members"]} {role}s'
           + ("" if feat["stability"] is None else f', stability {feat["stability"]:.2f} over {len(feat["runs"])} other runs')
           + "</p>", '<div class="cols"><div><h2>Activations</h2>', _histogram(feat["hist"], feat["hist_lo"], rec["hist_edges"]), "</div>"]
    if "logits" in feat:
        for side in ("promoted", "suppressed"):
            rows = "".join(f'<tr><td class="l snip">{_e(t)}</td><td>{v:+.3g}</td></tr>' for t, v in feat["logits"][side])
            out.append(f'<div><h2>Logits {side}</h2><table class="logits {side}">{rows}</table></div>')
    out.append("</div>")
    out.append(f'<h2>Top {len(feat["contexts"])} contexts</h2><div id="contexts">')
    for c in feat["contexts"]:
        where = ", ".join(f"{k} {_e(c[k])}" for k in ("split", "doc_id", "label", "context", "position") if c.get(k) is not None)
        out.append(f'<div class="meta">{c["value"]:.3g} &middot; {where}</div>'
                   f'<div class="ctx">{_token_spans(c, feat["max_act"])}</div>')
    out.append("</div>")
    out.append("<h2>Best match in every " + role + "</h2><table class=\"matches\"><tr><th>" + role +
               "</th><th>decoder match</th><th>cos</th><th>encoder match</th><th>cos</th></tr>")
    for m in feat["members"]:
        j, lat = m[role], m["dec_latent"]
        gid = j * rec["width"] + lat
        link = f'<a href="f{gid}.html">{role[0]}{j}.{lat}</a>' if gid in shown else f"{role[0]}{j}.{lat}"
        out.append(f"<tr><td>{j}</td><td>{link}</td><td>{m['dec_cos']:.3f}</td>"
                   f"<td>{role[0]}{j}.{m['enc_latent']}</td><td>{m['enc_cos']:.3f}</td></tr>")
    out.append("</table>")
    if feat["runs"]:
        out.append('<h2>Best match in other runs</h2><table class="runs"><tr><th class="l">run</th><th>feature</th><th>cos</th></tr>')
        out += [f'<tr><td class="l">{_e(r["run"])}</td><td>{r["feature"]}</td><td>{r["cos"]:.3f}</td></tr>' for r in feat["runs"]]
        out.append("</table>")
    out.append("</body></html>\n")
    return "".join(out)


def run_index(rec: dict[str, Any]) -> str:
    role, J = rec["role"], rec["members"]
    opts = "".join(f'<option value="{j}">{j}</option>' for j in range(J))
    cons = "".join(f'<option value="{c}">&ge; {c}</option>' for c in range(1, J + 1))
    out = [HEAD.format(title=_e(f"{rec['name']} features"), css="../style.css"),
           f'<p><a href="../index.html">all runs</a></p><h1>{_e(rec["name"])}: {rec["method"]} '
           f'{rec["arch"]}, {J} {role}s x {rec["width"]}</h1><p>{len(rec["features"])} features shown '
           f'({_e(rec["selection"])}), statistics over {rec["n_tokens"]} {rec["split"]} tokens.</p>',
           f'<div class="filters"><label>{role} <select id="member"><option value="">all</option>{opts}</select></label>'
           f'<label>consensus <select id="mincons">{cons}</select></label>'
           '<label>stability &ge; <input id="minstab" type="number" step="0.1" min="0" max="1" value="0"></label>'
           '<label>frequency &ge; <input id="minfreq" type="number" step="0.001" min="0" value="0"></label>'
           '<label>text <input id="text" type="search"></label> <span id="shown"></span> shown</div>',
           '<table id="features"><thead><tr><th class="l">feature</th><th data-key="member">' + role + '</th>'
           '<th data-key="frequency">frequency</th><th data-key="mean">mean</th><th data-key="max">max</th>'
           '<th data-key="consensus">consensus</th><th data-key="stability">stability</th>'
           '<th class="l">top context</th></tr></thead><tbody>']
    for feat in rec["features"]:
        stab = "" if feat["stability"] is None else f'{feat["stability"]:.4g}'
        snip = ""
        if feat["contexts"]:
            c = feat["contexts"][0]
            snip = _e("".join(c["tokens"][max(0, c["focus"] - 6) : c["focus"] + 2]).replace("\n", "\u21b5"))
        out.append(f'<tr data-member="{feat[role]}" data-frequency="{feat["frequency"]:.6g}" data-mean="{feat["mean_act"]:.4g}" '
                   f'data-max="{feat["max_act"]:.4g}" data-consensus="{feat["consensus"]}" data-stability="{stab}">'
                   f'<td class="l"><a href="features/f{feat["id"]}.html">{feature_name(rec, feat)}</a></td>'
                   f'<td>{feat[role]}</td><td>{feat["frequency"]:.3%}</td><td>{_fmt(feat["mean_act"])}</td>'
                   f'<td>{_fmt(feat["max_act"])}</td><td>{feat["consensus"]}</td><td>{_fmt(feat["stability"], 2)}</td>'
                   f'<td class="snip">{snip}</td></tr>')
    out.append("</tbody></table>" + SCRIPT + "</body></html>\n")
    return "".join(out)


def top_index(records: list[dict[str, Any]]) -> str:
    keys = ("explained_variance", "mse", "l0", "dead_fraction", "diversity")
    out = [HEAD.format(title="saeens features", css="style.css"), "<h1>Features</h1><table><tr><th class=\"l\">run</th>"
           "<th>method</th><th>features</th><th>consensus t</th><th>kept</th>"
           + "".join(f"<th>{k} full / consensus</th>" for k in keys) + "</tr>"]
    for rec in records:
        c = rec["consensus"]
        vals = "".join(f"<td>{_fmt(c['metrics_full'][k], 4)} / {_fmt(c['metrics_consensus'][k], 4)}</td>" for k in keys)
        out.append(f'<tr><td class="l"><a href="{_e(rec["name"])}/index.html">{_e(rec["name"])}</a></td><td>{rec["method"]}</td>'
                   f'<td>{rec["n_features"]}</td><td>{c["t"]}</td><td>{c["kept"]}</td>{vals}</tr>')
    out.append("</table></body></html>\n")
    return "".join(out)


def write_dashboard(out: Path, records: list[dict[str, Any]]) -> Path:
    """The HTML files of `records` under out (every file written atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "style.css", CSS)
    for rec in records:
        pages = out / rec["name"] / "features"
        pages.mkdir(parents=True, exist_ok=True)
        shown = {f["id"] for f in rec["features"]}
        for feat in rec["features"]:
            atomic_write_text(pages / f"f{feat['id']}.html", feature_page(rec, feat, shown))
        atomic_write_text(out / rec["name"] / "index.html", run_index(rec))
    return atomic_write_text(out / "index.html", top_index(records))
