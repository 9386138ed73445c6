(function () {
  "use strict";
  var slice = document.getElementById("filter-slice");
  var category = document.getElementById("filter-category");
  var count = document.getElementById("filter-count");
  if (!slice || !category || !count) {
    return;
  }
  function apply() {
    var s = slice.value;
    var c = category.value;
    var shown = 0;
    document.querySelectorAll("article.err").forEach(function (card) {
      var inSlice = !s || card.dataset.slices.split(" ").indexOf(s) >= 0;
      var ok = inSlice && (!c || card.dataset.category === c);
      card.hidden = !ok;
      shown += ok ? 1 : 0;
    });
    count.textContent = String(shown);
  }
  slice.addEventListener("change", apply);
  category.addEventListener("change", apply);
  document.querySelectorAll("a[data-slice], a[data-category]").forEach(function (link) {
    link.addEventListener("click", function () {
      slice.value = link.dataset.slice || "";
      category.value = link.dataset.category || "";
      apply();
    });
  });
  apply();
})();
