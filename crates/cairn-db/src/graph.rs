//! The reference graph in memory.
//!
//! Walking the graph with one SQL query per path costs a B-tree seek per edge: a closure of
//! 100k paths means 100k seeks and half a second. [`Graph`] instead keeps integer adjacency lists
//! indexed by the database's row ids (dense, since ids are handed out in order), loaded once
//! with two table scans and then kept in step with registrations, so a closure is a walk over
//! `u32`s with a bitset of visited nodes.

use std::collections::HashMap;

use cairn_nix::StorePath;

/// Forward and reverse adjacency over row ids.
#[derive(Debug, Default)]
pub struct Graph {
    ids: HashMap<StorePath, u32>,
    paths: Vec<Option<StorePath>>,
    refs: Vec<Vec<u32>>,
    referrers: Vec<Vec<u32>>,
}

/// Which way to walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Along references: the closure (requisites).
    References,
    /// Against references: everything that needs the start paths.
    Referrers,
}

impl Graph {
    fn grow(&mut self, id: u32) {
        let need = id as usize + 1;
        if self.paths.len() < need {
            self.paths.resize(need, None);
            self.refs.resize_with(need, Vec::new);
            self.referrers.resize_with(need, Vec::new);
        }
    }

    /// The first difference between this graph and `other` (a graph loaded from the database),
    /// in words; `None` when both have the same nodes under the same ids and the same edges both
    /// ways. `verify` uses it to check that the graph kept in step with registrations and
    /// collections still says what the database says.
    pub fn difference(&self, other: &Graph) -> Option<String> {
        let bound = self.paths.len().max(other.paths.len());
        let sorted = |v: Option<&Vec<u32>>| {
            let mut v = v.cloned().unwrap_or_default();
            v.sort_unstable();
            v.dedup();
            v
        };
        fn node(g: &Graph, id: usize) -> Option<&StorePath> {
            g.paths.get(id).and_then(Option::as_ref)
        }
        // Nodes first, so that a missing or extra path is named as such rather than as the
        // edges it changes.
        for id in 0..bound {
            let (a, b) = (node(self, id), node(other, id));
            if a != b {
                let show = |p: Option<&StorePath>| p.map_or_else(|| "nothing".to_owned(), |p| format!("'{p}'"));
                return Some(format!("row {id} is {} in memory and {} in the database", show(a), show(b)));
            }
        }
        for id in 0..bound {
            let Some(p) = node(self, id) else { continue };
            if sorted(self.refs.get(id)) != sorted(other.refs.get(id)) {
                return Some(format!("the references of '{p}' differ between memory and the database"));
            }
            if sorted(self.referrers.get(id)) != sorted(other.referrers.get(id)) {
                return Some(format!("the referrers of '{p}' differ between memory and the database"));
            }
        }
        (self.ids.len() != other.ids.len())
            .then(|| format!("{} paths by name in memory, {} in the database", self.ids.len(), other.ids.len()))
    }

    /// Adds a node with its database id.
    pub fn insert_node(&mut self, id: u32, path: StorePath) {
        self.grow(id);
        self.ids.insert(path.clone(), id);
        self.paths[id as usize] = Some(path);
    }

    /// Adds an edge `referrer → reference`.
    pub fn insert_edge(&mut self, referrer: u32, reference: u32) {
        self.grow(referrer.max(reference));
        self.refs[referrer as usize].push(reference);
        self.referrers[reference as usize].push(referrer);
    }

    /// Adds a node and its edges, given the references as paths (which must be nodes already,
    /// or the node itself).
    pub fn insert_path(&mut self, id: u32, path: &StorePath, references: impl IntoIterator<Item = u32>) {
        if self.ids.contains_key(path) {
            return;
        }
        self.insert_node(id, path.clone());
        for r in references {
            self.insert_edge(id, r);
        }
    }

    /// Removes a node and its outgoing edges. Callers remove referrers first: a node that is
    /// still referenced keeps its incoming edges, which would then dangle.
    pub fn remove_node(&mut self, id: u32) {
        let Some(path) = self.paths.get_mut(id as usize).and_then(Option::take) else { return };
        self.ids.remove(&path);
        for r in std::mem::take(&mut self.refs[id as usize]) {
            self.referrers[r as usize].retain(|&x| x != id);
        }
        self.referrers[id as usize].retain(|&x| x != id);
    }

    /// Whether a node has a referrer other than itself.
    pub fn is_referenced(&self, id: u32) -> bool {
        self.neighbours(id, Direction::Referrers).iter().any(|&r| r != id)
    }

    /// The ids of every node, in id order.
    pub fn node_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.paths.iter().enumerate().filter(|(_, p)| p.is_some()).map(|(i, _)| i as u32)
    }

    /// One past the largest id: the size of a bitset over nodes.
    pub fn id_bound(&self) -> usize {
        self.paths.len()
    }

    pub fn id(&self, path: &StorePath) -> Option<u32> {
        self.ids.get(path).copied()
    }

    pub fn path(&self, id: u32) -> Option<&StorePath> {
        self.paths.get(id as usize).and_then(Option::as_ref)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Direct neighbours of a node.
    pub fn neighbours(&self, id: u32, dir: Direction) -> &[u32] {
        let adj = match dir {
            Direction::References => &self.refs,
            Direction::Referrers => &self.referrers,
        };
        adj.get(id as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every node reachable from `start` (included), in topological order with each node after
    /// everything it points to (for [`Direction::References`]: dependencies first, as
    /// `nix-store -qR` prints them).
    pub fn walk(&self, start: &[u32], dir: Direction) -> Vec<u32> {
        let mut seen = vec![false; self.paths.len()];
        let mut order = Vec::new();
        // Iterative post-order DFS: (node, index of next neighbour to visit).
        let mut stack: Vec<(u32, usize)> = Vec::new();
        for &s in start {
            if (s as usize) >= seen.len() || seen[s as usize] {
                continue;
            }
            seen[s as usize] = true;
            stack.push((s, 0));
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                let adj = self.neighbours(node, dir);
                if let Some(&n) = adj.get(*next) {
                    *next += 1;
                    if n != node && !seen[n as usize] {
                        seen[n as usize] = true;
                        stack.push((n, 0));
                    }
                } else {
                    order.push(node);
                    stack.pop();
                }
            }
        }
        order
    }
}
