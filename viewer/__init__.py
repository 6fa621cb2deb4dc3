"""The web viewer: static ES modules (no build step) with three.js and uPlot vendored at pinned
versions; served by the aggregator for all sites and by each gateway for its own line."""
