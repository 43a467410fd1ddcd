from vitlens.relevance.heatmap import heatmap
