"use strict";
(function () {
  const data = JSON.parse(document.getElementById("timeline-data").textContent);
  const SVG = "http://www.w3.org/2000/svg";
  const LANE = 18, LEFT = 230, RIGHT = 20, TOP = 24, BOTTOM = 30;
  const tip = document.getElementById("tip");

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const key in attrs) node.setAttribute(key, attrs[key]);
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceStep(range) {
    const raw = range / 8, power = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * power >= raw) return m * power;
    return 10 * power;
  }

  function describe(session, m) {
    const lane = session.lanes[m.lane];
    const lines = [
      "#" + m.seq + "  " + m.t.toFixed(3) + " ms  " + m.dir + "  id=" + m.id,
      m.summary,
      "step " + m.label + (lane.name ? " — " + lane.name : ""),
      lane.function ? "QEMU: " + lane.function : "QEMU function: unknown",
    ];
    if (m.reason) lines.push("why: " + m.reason);
    return lines;
  }

  function showTip(event, lines) {
    tip.textContent = "";
    lines.forEach(function (line, i) {
      const div = document.createElement("div");
      div.textContent = line;
      if (i === 0) div.className = "head";
      tip.appendChild(div);
    });
    tip.style.display = "block";
    tip.style.left = (event.pageX + 14) + "px";
    tip.style.top = (event.pageY + 14) + "px";
  }

  function drawSession(session, holder) {
    const width = Math.max(holder.clientWidth, 600);
    const height = TOP + BOTTOM + LANE * session.lanes.length;
    const svg = el("svg", {width: width, height: height, class: "timeline"}, holder);
    const full = [0, Math.max(session.end, 1e-3)];
    let view = full.slice();
    const plot = width - LEFT - RIGHT;
    session.lanes.forEach(function (lane, i) {
      const y = TOP + i * LANE;
      el("rect", {x: 0, y: y, width: width, height: LANE, class: i % 2 ? "lane odd" : "lane"}, svg);
      const text = el("text", {x: 4, y: y + LANE - 5, class: "lanelabel"}, svg);
      text.textContent = lane.step + "  " + lane.name;
    });
    const clipId = "clip" + session.index;
    const clip = el("clipPath", {id: clipId}, el("defs", {}, svg));
    el("rect", {x: LEFT, y: 0, width: plot, height: height}, clip);
    const body = el("g", {"clip-path": "url(#" + clipId + ")"}, svg);
    const axis = el("g", {class: "axis"}, svg);
    const spans = session.spans.map(function (s) {
      return [s, el("rect", {y: TOP + s[0] * LANE + 2, height: LANE - 4, class: "server"}, body)];
    });
    const ticks = session.messages.map(function (m) {
      const y = TOP + m.lane * LANE;
      const line = el("line", {y1: y + 3, y2: y + LANE - 3,
                               class: "tick " + m.dir + (m.certain ? "" : " uncertain")}, body);
      line.addEventListener("mousemove", function (e) { showTip(e, describe(session, m)); });
      line.addEventListener("mouseleave", function () { tip.style.display = "none"; });
      return [m, line];
    });
    function x(t) { return LEFT + (t - view[0]) / (view[1] - view[0]) * plot; }
    function render() {
      spans.forEach(function (pair) {
        const s = pair[0], a = x(s[1]), b = x(s[2]);
        pair[1].setAttribute("x", a);
        pair[1].setAttribute("width", Math.max(b - a, 0.5));
      });
      ticks.forEach(function (pair) {
        const at = x(pair[0].t);
        pair[1].setAttribute("x1", at);
        pair[1].setAttribute("x2", at);
      });
      axis.textContent = "";
      const step = niceStep(view[1] - view[0]);
      for (let t = Math.ceil(view[0] / step) * step; t <= view[1]; t += step) {
        el("line", {x1: x(t), x2: x(t), y1: TOP, y2: height - BOTTOM + 4, class: "grid"}, axis);
        const label = el("text", {x: x(t), y: height - BOTTOM + 16, class: "axislabel"}, axis);
        label.textContent = Number(t.toPrecision(6)) + " ms";
      }
    }
    svg.addEventListener("wheel", function (e) {
      e.preventDefault();
      const box = svg.getBoundingClientRect();
      const at = view[0] + (e.clientX - box.left - LEFT) / plot * (view[1] - view[0]);
      const factor = e.deltaY < 0 ? 0.8 : 1.25;
      let lo = at - (at - view[0]) * factor, hi = at + (view[1] - at) * factor;
      if (hi - lo >= full[1] - full[0]) { lo = full[0]; hi = full[1]; }
      view = [lo, hi];
      render();
    }, {passive: false});
    let drag = null;
    svg.addEventListener("mousedown", function (e) { drag = [e.clientX, view.slice()]; });
    window.addEventListener("mouseup", function () { drag = null; });
    window.addEventListener("mousemove", function (e) {
      if (!drag) return;
      const shift = (e.clientX - drag[0]) / plot * (drag[1][1] - drag[1][0]);
      view = [drag[1][0] - shift, drag[1][1] - shift];
      render();
    });
    svg.addEventListener("dblclick", function () { view = full.slice(); render(); });
    render();
  }

  data.sessions.forEach(function (session) {
    drawSession(session, document.getElementById("timeline-" + session.index));
  });
  document.body.dataset.ready = "1";
})();
