"""`weft bench`: native vs every backend, qperf tcp_bw/tcp_lat, container to container.

stats (pure arithmetic and the result model), qperf and cpu (edges: processes and the
kernel's accounting), runner (testbeds and the interleaved schedule), report (table,
JSON, chart).
"""
