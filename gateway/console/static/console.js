// payroll-gateway console: the little that script helps with; every page works without it.
// "/" focuses the first filter field; the overview refreshes itself every 30 s while no
// field has focus and nothing is typed.
(function () {
  "use strict";
  document.addEventListener("keydown", function (event) {
    var target = event.target;
    var typing = target && (target.tagName === "INPUT" || target.tagName === "SELECT" || target.tagName === "TEXTAREA");
    if (event.key === "/" && !typing) {
      var first = document.querySelector(".filters select, .filters input:not([type=hidden])");
      if (first) { event.preventDefault(); first.focus(); }
    }
  });
  if (document.querySelector("table.overview")) {
    window.setInterval(function () {
      var active = document.activeElement;
      var busy = active && active !== document.body && active.tagName !== "A";
      var typed = Array.prototype.some.call(document.querySelectorAll("input[name=reason]"), function (i) { return i.value; });
      if (!busy && !typed) { window.location.reload(); }
    }, 30000);
  }
})();
