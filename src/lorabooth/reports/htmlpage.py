"""What the self-contained HTML reports (sweep, tune) share."""

# Marks the page with how many of its images decoded, so a test in a real
# browser can check them all (the reports' CSP allows inline scripts only).
IMAGES_LOADED_SCRIPT = """<script>
window.addEventListener("load", function () {
  var ok = Array.prototype.filter.call(document.images, function (i) {
    return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + document.images.length);
});
</script>
"""
