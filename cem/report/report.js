'use strict';
// Builds the cards from the JSON block. Every value from the data goes into the page through
// textContent, DOM properties or style properties: never as markup (no innerHTML), never as a URL
// other than the thumbnail data URIs written by cem itself.
const D = JSON.parse(document.getElementById('cem-data').textContent);
const S = D.summary;
const THUMB = /^data:image\/jpeg;base64,[A-Za-z0-9+/]+=*$/;
const GROUNDING = new Set(['supported', 'contradicted', 'unverifiable']);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
const isNum = v => typeof v === 'number' && isFinite(v);
const fmt = v => (isNum(v) ? v.toFixed(2) : 'n/a');

function bar(cls, p) {
  const b = el('div', cls);
  b.style.width = (isNum(p) ? Math.max(0, Math.min(100, 100 * p)) : 0) + '%';
  b.title = fmt(p);
  return b;
}

function faceNode(f) {
  const box = el('div', 'face');
  box.dataset.face = String(f.index);
  const head = el('div');
  head.append(el('b', null, `face ${f.index + 1}`), ' · top ', el('b', null, f.top ?? 'none'));
  if (f.track !== null) head.append(' ', el('span', 'muted', `track ${f.track}`));
  if (f.error) head.append(' ', el('span', 'errmsg', f.error));
  box.append(head);
  const bars = el('div', 'bars');
  bars.append(el('span'), el('span', 'muted', 'emotion'), el('span', 'muted', 'expression'));
  const expr = new Map(f.expression);
  for (const [k, p] of f.emotion) bars.append(el('span', null, k), bar('bar', p), bar('bar x', expr.get(k)));
  box.append(bars);
  const aus = el('div', 'muted', 'AUs: ');
  if (!f.aus.length) aus.append('none measured');
  f.aus.forEach(([code, v, present], i) => {
    if (i) aus.append(', ');
    aus.append(present ? el('b', null, `${code} ${fmt(v)}`) : `${code} ${fmt(v)}`);
  });
  box.append(aus);
  if (f.cues.length) {
    const ul = el('ul');
    for (const c of f.cues) {
      const li = el('li', null, `${c.cue} → ${c.supports ?? '?'}`);
      if (c.role && c.role !== 'for') li.append(' ', el('span', 'muted', `(${c.role})`));
      if (c.grounding) li.append(el('span', 'badge' + (GROUNDING.has(c.grounding) ? ' ' + c.grounding : ''), c.grounding));
      ul.append(li);
    }
    if (f.more_cues) ul.append(el('li', 'muted', `… and ${f.more_cues} more cues`));
    box.append(ul);
  }
  if (f.rationale) box.append(el('div', null, f.rationale));
  return box;
}

function fill(sec, c) {
  if (c.thumb && THUMB.test(c.thumb)) {
    const t = el('div', 'thumb');
    const img = el('img');
    img.alt = '';
    img.src = c.thumb;
    t.append(img);
    for (const f of c.faces) {
      if (!f.box) continue;
      const b = el('div', 'box');
      [b.style.left, b.style.top, b.style.width, b.style.height] = f.box.map(v => v + 'px');
      b.append(el('b', null, String(f.index + 1)));
      t.append(b);
    }
    sec.append(t);
  }
  const body = el('div', 'faces');
  const head = el('div', 'head');
  head.append(el('b', 'name', c.image), ' ', el('span', 'muted', `${c.w ?? '?'}×${c.h ?? '?'}`));
  if (c.moment) head.append(' ', el('span', 'muted', c.moment));
  if (c.context) head.append(el('div', 'muted context', `context: ${c.context}`));
  for (const [k, v] of c.extra) head.append(el('div', 'muted extra', `${k}: ${v}`));
  for (const n of c.notes) head.append(el('div', 'warn note', n));
  if (c.error) head.append(el('div', 'errmsg', c.error));
  if (!c.error && !c.faces.length) head.append(' ', el('span', 'muted', 'no face found'));
  body.append(head);
  for (const f of c.faces) body.append(faceNode(f));
  sec.append(body);
  sec.dataset.done = '1';
}

const hist = document.getElementById('hist');
const ftop = document.getElementById('ftop');
const mx = S.top_emotions.reduce((m, [, v]) => Math.max(m, v), 1);
for (const [k, v] of S.top_emotions) {
  const d = el('div');
  d.style.height = (60 * v / mx) + 'px';
  d.title = `${k}: ${v}`;
  d.append(el('span', null, `${k} ${v}`));
  hist.append(d);
  const o = el('option', null, k);
  o.value = k;
  ftop.append(o);
}

const main = document.getElementById('cards');
const EAGER = 40; // the first cards render at once; the rest when they scroll near the viewport
const sections = [];
const lazy = new IntersectionObserver(entries => {
  for (const e of entries) {
    if (e.isIntersecting && !e.target.dataset.done) {
      fill(e.target, D.cards[Number(e.target.dataset.i)]);
      lazy.unobserve(e.target);
    }
  }
}, {rootMargin: '800px'});
D.cards.forEach((c, i) => {
  const bad = Boolean(c.error) || c.faces.some(f => f.error);
  const sec = el('section', 'card' + (bad ? ' err' : ''));
  sec.dataset.i = String(i);
  sections.push({sec, bad, tops: c.faces.map(f => f.top)});
  main.append(sec);
  if (i < EAGER) fill(sec, c); else lazy.observe(sec);
});

function filter() {
  const t = ftop.value;
  const errorsOnly = document.getElementById('ferr').checked;
  let n = 0;
  for (const {sec, bad, tops} of sections) {
    const ok = (!t || tops.includes(t)) && (!errorsOnly || bad);
    sec.hidden = !ok;
    n += ok;
  }
  document.getElementById('shown').textContent = `${n} shown`;
}
ftop.addEventListener('change', filter);
document.getElementById('ferr').addEventListener('change', filter);
filter();
