//! Weighted PageRank, the ranking step of TextRank (keywords over a co-occurrence graph,
//! summaries over a sentence-similarity graph).

/// Scores of the nodes of an undirected graph given as adjacency lists of `(neighbour,
/// weight)`, each edge listed from both ends. Every node starts at 1; isolated nodes keep the
/// teleport score `1 - damping`. Stops after `max_iterations` or when no score moves by more
/// than 1e-6.
pub fn pagerank(adjacency: &[Vec<(usize, f64)>], damping: f64, max_iterations: usize) -> Vec<f64> {
    let n = adjacency.len();
    let out_weight: Vec<f64> = adjacency
        .iter()
        .map(|edges| edges.iter().map(|(_, w)| w).sum())
        .collect();
    let mut scores = vec![1.0; n];
    for _ in 0..max_iterations {
        let mut next = vec![1.0 - damping; n];
        for (i, edges) in adjacency.iter().enumerate() {
            for &(j, w) in edges {
                let total = out_weight.get(j).copied().unwrap_or(0.0);
                if total > 0.0
                    && let Some(score) = scores.get(j)
                {
                    next[i] += damping * w / total * score;
                }
            }
        }
        let moved = scores
            .iter()
            .zip(&next)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        scores = next;
        if moved < 1e-6 {
            break;
        }
    }
    scores
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_of_a_star_ranks_first_and_isolated_nodes_last() {
        // 0 is linked to 1, 2 and 3; 4 is alone.
        let adjacency = vec![
            vec![(1, 1.0), (2, 1.0), (3, 1.0)],
            vec![(0, 1.0)],
            vec![(0, 1.0)],
            vec![(0, 1.0)],
            vec![],
        ];
        let scores = pagerank(&adjacency, 0.85, 100);
        assert!(scores[0] > scores[1]);
        assert!((scores[1] - scores[2]).abs() < 1e-9);
        assert!((scores[4] - 0.15).abs() < 1e-9);
    }

    #[test]
    fn empty_graph_is_fine() {
        assert!(pagerank(&[], 0.85, 10).is_empty());
    }
}
