// Live search for the viewer: optional; the search form works without JavaScript.
// Results are built with textContent only: explanations are untrusted text.
(function () {
  "use strict";
  var input = document.getElementById("bigq");
  var box = document.getElementById("results");
  if (!input || !box) return;
  var form = input.form;
  var api = box.getAttribute("data-api");
  var local = window.NS_UNITS || null;

  function mode() {
    var r = form.querySelector("input[name=mode]:checked");
    return r ? r.value : "text";
  }
  function cell(tr, text, href) {
    var td = document.createElement("td");
    if (href) {
      var a = document.createElement("a");
      a.href = href;
      a.textContent = text;
      td.appendChild(a);
    } else {
      td.textContent = text;
    }
    tr.appendChild(td);
  }
  function fmt(x) { return x === null || x === undefined ? "–" : Number(x).toFixed(3); }
  function show(results, note, withSim) {
    box.textContent = "";
    if (note || !results.length) {
      var p = document.createElement("p");
      p.className = "note";
      p.textContent = note || "no unit matches";
      box.appendChild(p);
      return;
    }
    var table = document.createElement("table");
    table.className = "units results";
    var head = table.createTHead().insertRow();
    (withSim ? ["similarity", "unit", "explanation", "score"] : ["unit", "explanation", "score"])
      .forEach(function (h) { var th = document.createElement("th"); th.textContent = h; head.appendChild(th); });
    var body = table.createTBody();
    results.forEach(function (r) {
      var tr = body.insertRow();
      if (withSim) cell(tr, fmt(r.similarity));
      cell(tr, r.name, r.url);
      cell(tr, r.explanation);
      cell(tr, fmt(r.score));
    });
    box.appendChild(table);
  }
  function searchLocal(q) {
    if (mode() === "meaning") {
      show([], "search by meaning needs the server (neuroscribe serve); text search works here");
      return;
    }
    var words = q.toLowerCase().split(/\W+/).filter(Boolean);
    if (!words.length) { show([], "type a few words to search the explanations"); return; }
    var out = [];
    for (var i = 0; i < local.length && out.length < 50; i++) {
      var text = local[i][2].toLowerCase();
      if (words.every(function (w) { return text.indexOf(w) >= 0; }))
        out.push({url: local[i][0], name: local[i][1], explanation: local[i][2], score: local[i][3]});
    }
    show(out, "", false);
  }
  var timer = null, seq = 0;
  function run() {
    var q = input.value;
    if (local) { searchLocal(q); return; }
    if (!api) return;
    var mine = ++seq, m = mode();
    fetch(api + "?q=" + encodeURIComponent(q) + "&mode=" + encodeURIComponent(m))
      .then(function (r) { return r.json(); })
      .then(function (d) { if (mine === seq) show(d.results, d.note, m === "meaning"); });
  }
  input.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(run, 250); });
  if (local) {
    form.addEventListener("submit", function (ev) { ev.preventDefault(); run(); });
    var params = new URLSearchParams(window.location.search);
    if (params.get("q")) {
      input.value = params.get("q");
      if (params.get("mode") === "meaning") form.querySelector("input[value=meaning]").checked = true;
      run();
    }
  }
})();
