// The credit explorer of `tokenmdp explain`: draws the page from the JSON document in
// #explorer-data (its schema: tokenmdp/reports/explorer.py). No network, no library.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("explorer-data").textContent);
  var colours = data.colours;
  var truth = data.truth;

  function $id(id) { return document.getElementById(id); }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = text; }
    return node;
  }

  // a value scaled to [-1, 1] -> the colour map's entry (explorer.colour_of in Python)
  function colour(x) {
    var k = Math.round((x + 1) / 2 * (colours.length - 1));
    return colours[Math.min(Math.max(k, 0), colours.length - 1)];
  }

  function ink(x) { return Math.abs(x) > 0.6 ? "#fff" : "#000"; }

  function fmt(x) {
    if (x === null || x === undefined) { return "n/a"; }
    if (x === 0) { return "0.0000"; }
    var a = Math.abs(x);
    return (a >= 1e-3 && a < 1e5) ? x.toFixed(4) : x.toExponential(3);
  }

  function short(x) {  // a reward: 4 significant digits, no trailing zeros
    return x === null || x === undefined ? "n/a" : String(Number(x.toPrecision(4)));
  }

  function three(x) { return x === null || x === undefined ? "n/a" : x.toFixed(3); }

  function signed(x) {
    var text = fmt(x);
    return (x !== null && x !== undefined && x >= 0) ? "+" + text : text;
  }

  function show(text) {  // a token's text with its white space visible
    return text.replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5") || "\u2205";
  }

  function maxAbs(values) {
    var m = 0;
    for (var i = 0; i < values.length; i++) {
      if (values[i] !== null && Math.abs(values[i]) > m) { m = Math.abs(values[i]); }
    }
    return m;
  }

  function scaled(values, t) {
    var m = maxAbs(values);
    return (m > 0 && values[t] !== null) ? values[t] / m : 0;
  }

  function withError(x, err) {
    return err === null || err === undefined ? signed(x) : signed(x) + " \u00b1 " + fmt(err);
  }

  // --- header, controls, legend ---------------------------------------------------------
  var select = $id("estimator");
  data.rows.forEach(function (row) {
    var option = el("option", null, row.truth ? row.label + " (ground truth)" : row.label);
    option.value = row.label;
    select.appendChild(option);
  });
  select.value = data.selected;
  $id("truth-name").textContent = truth;
  $id("corr-title").textContent = "Correlation with " + truth + " over all sampled tokens";

  var legend = $id("legend");
  var bar = el("span", "bar");
  bar.style.background = "linear-gradient(to right, " + colours.join(", ") + ")";
  legend.appendChild(el("span", null, "\u2212max |credit|"));
  legend.appendChild(bar);
  legend.appendChild(el("span", null, "+max |credit|"));

  // --- responses ------------------------------------------------------------------------
  var boxes = [];  // boxes[r][t]: the token's element
  var container = $id("responses");
  data.responses.forEach(function (resp, r) {
    var section = el("div", "response");
    section.id = "response-" + r;
    section.appendChild(el("h3", null, "Response " + r + ": prompt " + resp.prompt + " (#" + resp.prompt_index +
      "), R = " + short(resp.reward) + ", " + resp.tokens.length + (resp.tokens.length > 1 ? " tokens" : " token")));
    var strip = el("div", "tokens");
    var row = [];
    resp.tokens.forEach(function (text, t) {
      var box = el("span", "tok");
      box.dataset.r = r;
      box.dataset.t = t;
      box.appendChild(el("span", "txt", show(text)));
      var stripe = el("span", "gt");
      stripe.style.background = colour(scaled(resp.credit[truth], t));
      box.appendChild(stripe);
      strip.appendChild(box);
      row.push(box);
    });
    boxes.push(row);
    section.appendChild(strip);
    container.appendChild(section);
  });

  function recolour() {
    var label = select.value;
    data.responses.forEach(function (resp, r) {
      var values = resp.credit[label];
      boxes[r].forEach(function (box, t) {
        var x = scaled(values, t);
        box.style.background = colour(x);
        box.style.color = ink(x);
      });
    });
    if (current) { fill(current.r, current.t); }
  }
  select.addEventListener("change", recolour);

  // --- the hover panel ------------------------------------------------------------------
  var panel = $id("panel");
  var current = null;

  function cellRow(table, name, value, cls, field) {
    var tr = el("tr", cls);
    tr.appendChild(el("td", null, name));
    var td = el("td", "num", value);
    if (field) { td.dataset.field = field; }
    tr.appendChild(td);
    table.appendChild(tr);
    return tr;
  }

  function fill(r, t) {
    var resp = data.responses[r];
    current = { r: r, t: t };
    panel.textContent = "";
    var head = el("div");
    head.appendChild(el("span", "tokname", "\u201c" + show(resp.tokens[t]) + "\u201d"));
    head.appendChild(el("span", null, "  t=" + t + ", token id " + resp.ids[t] + ", response " + r));
    panel.appendChild(head);
    var table = el("table");
    cellRow(table, "\u03c0 (this policy)", fmt(resp.policy_prob[t]), null, "policy_prob");
    cellRow(table, "\u03c0_ref (reference)", fmt(resp.ref_prob[t]), null, "ref_prob");
    data.rows.forEach(function (row) {
      var err = resp.stderr[row.label] ? resp.stderr[row.label][t] : null;
      var cls = (row.truth ? "truth" : "") + (row.label === select.value ? " sel" : "");
      var tr = cellRow(table, row.label, withError(resp.credit[row.label][t], err), cls, row.truth ? "truth" : "credit");
      tr.dataset.label = row.label;
    });
    panel.appendChild(table);
  }

  function place(ev) {
    var w = panel.offsetWidth, h = panel.offsetHeight;
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + w > window.innerWidth) { x = Math.max(0, ev.clientX - w - 14); }
    if (y + h > window.innerHeight) { y = Math.max(0, ev.clientY - h - 14); }
    panel.style.left = x + "px";
    panel.style.top = y + "px";
  }

  container.addEventListener("mouseover", function (ev) {
    var box = ev.target.closest(".tok");
    if (!box) { return; }
    fill(Number(box.dataset.r), Number(box.dataset.t));
    panel.hidden = false;
    place(ev);
  });
  container.addEventListener("mousemove", function (ev) { if (!panel.hidden) { place(ev); } });
  container.addEventListener("mouseleave", function () { panel.hidden = true; });

  // --- correlation table ----------------------------------------------------------------
  var corr = $id("correlations");
  var anyInterval = data.rows.some(function (row) { return row.interval; });
  var head = el("tr");
  ["estimator", "corr with " + truth].concat(anyInterval ? ["interval"] : []).concat(["how it is computed"])
    .forEach(function (name) { head.appendChild(el("th", null, name)); });
  corr.appendChild(head);
  data.rows.forEach(function (row) {
    var tr = el("tr", row.truth ? "truth" : null);
    tr.appendChild(el("td", null, row.label));
    tr.appendChild(el("td", "num", three(row.correlation)));
    if (anyInterval) {
      tr.appendChild(el("td", "num", row.interval ? "[" + three(row.interval[0]) + ", " + three(row.interval[1]) + "]" : ""));
    }
    tr.appendChild(el("td", null, row.note));
    corr.appendChild(tr);
  });
  Object.keys(data.skipped).forEach(function (name) {
    $id("skipped").appendChild(el("p", null, "skipped " + name + ": " + data.skipped[name]));
  });

  // --- prefix trees (toy runs) ----------------------------------------------------------
  var tree = null;
  var treeScale = 0;

  function nodeLine(node) {
    var line = el("div", "node");
    line.dataset.node = node.id;
    var expandable = node.kids.length > 0 || node.hidden > 0;
    line.appendChild(el("span", "toggle", expandable ? "\u25b8" : "\u00b7"));
    if (node.depth < 0) {
      line.appendChild(el("span", "tokname", "prompt " + node.token));
      return line;
    }
    line.appendChild(el("span", "tokname", show(node.token)));
    [["\u03c0", node.pi, "pi"], ["\u03c0_ref", node.ref, "ref"], ["\u03c0*", node.opt, "opt"]]
      .forEach(function (item) { line.appendChild(el("span", "v", item[0] + " " + fmt(item[1]))).dataset.field = item[2]; });
    var a = el("span", "v astar", "A* " + signed(node.a));
    a.dataset.field = "a";
    var x = treeScale > 0 ? node.a / treeScale : 0;
    a.style.background = colour(x);
    a.style.color = ink(x);
    line.appendChild(a);
    line.appendChild(el("span", "v", "r " + short(node.r)));
    if (node.end) { line.appendChild(el("span", "hidden-note", "ends")); }
    return line;
  }

  function nodeItem(node) {
    var li = el("li");
    li.dataset.node = node.id;
    li.appendChild(nodeLine(node));
    return li;
  }

  function expand(li, open) {
    var node = tree.nodes[Number(li.dataset.node)];
    var list = li.querySelector(":scope > ul");
    var toggle = li.querySelector(":scope > .node > .toggle");
    if (list) {
      var visible = open === undefined ? list.hidden : open;
      list.hidden = !visible;
      if (toggle && (node.kids.length || node.hidden)) { toggle.textContent = visible ? "\u25be" : "\u25b8"; }
      return list;
    }
    if (open === false || (!node.kids.length && !node.hidden)) { return null; }
    list = el("ul");
    node.kids.forEach(function (k) { list.appendChild(nodeItem(tree.nodes[k])); });
    if (node.hidden) {
      list.appendChild(el("li", "hidden-note", node.hidden + " more branch" + (node.hidden > 1 ? "es" : "") +
        " left out (reached with probability < " + data.limits.min_reach + " under \u03c0 and \u03c0*, or past the " +
        data.limits.max_nodes + "-branch limit)"));
    }
    li.appendChild(list);
    if (toggle) { toggle.textContent = "\u25be"; }
    return list;
  }

  function drawTree(index) {
    tree = data.trees[index];
    treeScale = 0;
    tree.nodes.forEach(function (n) { if (n.depth >= 0 && Math.abs(n.a) > treeScale) { treeScale = Math.abs(n.a); } });
    var root = $id("tree");
    root.textContent = "";
    var li = nodeItem(tree.nodes[0]);
    root.appendChild(li);
    expand(li, true);  // the root starts expanded
    var cut = "Embedded: " + tree.shown + " of this prompt's " + tree.total + " branches. Left out, each with the " +
      "subtree below it: " + tree.cut_reach + " branches reached with probability < " + data.limits.min_reach +
      " under both \u03c0 and \u03c0*";
    cut += tree.cut_limit ? ", and " + tree.cut_limit + " more past the limit of " + data.limits.max_nodes +
      " branches for the page (split over its " + data.trees.length + " prompt" + (data.trees.length > 1 ? "s" : "") + ")."
      : "; none was cut by the page's limit of " + data.limits.max_nodes + " branches.";
    $id("tree-cut").textContent = cut;
  }

  if (data.trees.length) {
    $id("tree-section").hidden = false;
    var promptSelect = $id("tree-prompt");
    data.trees.forEach(function (t, k) {
      var option = el("option", null, "#" + t.prompt_index + ": " + t.prompt);
      option.value = k;
      promptSelect.appendChild(option);
    });
    if (data.trees.length < 2) { $id("tree-prompt-label").hidden = true; }
    promptSelect.addEventListener("change", function () { drawTree(Number(promptSelect.value)); });
    $id("tree").addEventListener("click", function (ev) {
      var line = ev.target.closest(".node");
      if (line) { expand(line.parentNode); }
    });
    drawTree(0);

    // clicking a token opens its path in its prompt's tree
    container.addEventListener("click", function (ev) {
      var box = ev.target.closest(".tok");
      if (!box) { return; }
      var resp = data.responses[Number(box.dataset.r)];
      var k = data.trees.findIndex(function (t) { return t.prompt_index === resp.prompt_index; });
      if (k < 0) { return; }
      promptSelect.value = k;
      drawTree(k);
      var li = $id("tree").firstChild;
      var found = null;
      for (var t = 0; t <= Number(box.dataset.t); t++) {
        var list = expand(li, true);
        var next = null;
        if (list) {
          list.querySelectorAll(":scope > li[data-node]").forEach(function (child) {
            if (tree.nodes[Number(child.dataset.node)].id_token === resp.ids[t]) { next = child; }
          });
        }
        if (!next) { break; }
        li = next;
        found = li;
      }
      document.querySelectorAll(".node.found").forEach(function (n) { n.classList.remove("found"); });
      if (found && Number(found.dataset.node) && tree.nodes[Number(found.dataset.node)].depth === Number(box.dataset.t)) {
        found.querySelector(":scope > .node").classList.add("found");
        found.scrollIntoView({ block: "center" });
      } else {
        $id("tree-cut").scrollIntoView({ block: "center" });
      }
    });
  }

  // --- static heat maps -----------------------------------------------------------------
  if (data.images.length) {
    data.images.forEach(function (image) {
      var img = el("img");
      img.alt = image.name;
      img.src = image.src;
      $id("images").appendChild(img);
    });
  } else {
    $id("heat-maps").hidden = true;
  }

  recolour();
  document.body.dataset.ready = "1";
}());
