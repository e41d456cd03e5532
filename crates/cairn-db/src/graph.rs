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
///
/// Row ids are never reused (the table is AUTOINCREMENT, as Nix's is), so a daemon that adds and
/// collects for months hands out ids far beyond the number of valid paths. The tables are
/// therefore two-level: `slots` maps a row id to a node (4 bytes per id ever handed out) and
/// `nodes` holds the live nodes, whose places are reused once freed.
#[derive(Debug, Default)]
pub struct Graph {
    ids: HashMap<StorePath, u32>,
    slots: Vec<u32>,
    nodes: Vec<Node>,
    /// Places in `nodes` free for reuse.
    free: Vec<u32>,
}

/// No node: a slot's value for a row id without one.
const NONE: u32 = u32::MAX;

#[derive(Debug, Default)]
struct Node {
    path: Option<StorePath>,
    refs: Vec<u32>,
    referrers: Vec<u32>,
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
    fn node(&self, id: u32) -> Option<&Node> {
        match self.slots.get(id as usize) {
            Some(&i) if i != NONE => self.nodes.get(i as usize),
            _ => None,
        }
    }

    /// The node of `id`, made (without a path, for now) if it has none.
    fn node_mut(&mut self, id: u32) -> &mut Node {
        let need = id as usize + 1;
        if self.slots.len() < need {
            self.slots.resize(need, NONE);
        }
        let mut i = self.slots[id as usize];
        if i == NONE {
            i = match self.free.pop() {
                Some(i) => i,
                None => {
                    self.nodes.push(Node::default());
                    (self.nodes.len() - 1) as u32
                }
            };
            self.slots[id as usize] = i;
        }
        &mut self.nodes[i as usize]
    }

    /// Frees the node of `id` if nothing is left in it.
    fn release(&mut self, id: u32) {
        let Some(&i) = self.slots.get(id as usize) else { return };
        if i == NONE {
            return;
        }
        let n = &mut self.nodes[i as usize];
        if n.path.is_none() && n.refs.is_empty() && n.referrers.is_empty() {
            // Give the lists' memory back too: a reused place starts empty.
            *n = Node::default();
            self.slots[id as usize] = NONE;
            self.free.push(i);
        }
    }

    /// The first difference between this graph and `other` (a graph loaded from the database),
    /// in words; `None` when both have the same nodes under the same ids and the same edges both
    /// ways. `verify` uses it to check that the graph kept in step with registrations and
    /// collections still says what the database says.
    pub fn difference(&self, other: &Graph) -> Option<String> {
        let bound = self.slots.len().max(other.slots.len());
        let sorted = |v: &[u32]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v.dedup();
            v
        };
        fn node(g: &Graph, id: usize) -> Option<&StorePath> {
            g.path(id as u32)
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
            let (id, refs, referrers) = (id as u32, Direction::References, Direction::Referrers);
            if sorted(self.neighbours(id, refs)) != sorted(other.neighbours(id, refs)) {
                return Some(format!("the references of '{p}' differ between memory and the database"));
            }
            if sorted(self.neighbours(id, referrers)) != sorted(other.neighbours(id, referrers)) {
                return Some(format!("the referrers of '{p}' differ between memory and the database"));
            }
        }
        (self.ids.len() != other.ids.len())
            .then(|| format!("{} paths by name in memory, {} in the database", self.ids.len(), other.ids.len()))
    }

    /// Adds a node with its database id.
    pub fn insert_node(&mut self, id: u32, path: StorePath) {
        self.ids.insert(path.clone(), id);
        self.node_mut(id).path = Some(path);
    }

    /// Adds an edge `referrer → reference`.
    pub fn insert_edge(&mut self, referrer: u32, reference: u32) {
        self.node_mut(referrer).refs.push(reference);
        self.node_mut(reference).referrers.push(referrer);
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
        if self.path(id).is_none() {
            return;
        }
        let node = self.node_mut(id);
        let (path, refs) = (node.path.take(), std::mem::take(&mut node.refs));
        node.referrers.retain(|&x| x != id);
        if let Some(path) = path {
            self.ids.remove(&path);
        }
        for r in refs {
            if r != id {
                self.node_mut(r).referrers.retain(|&x| x != id);
                self.release(r);
            }
        }
        self.release(id);
    }

    /// Whether a node has a referrer other than itself.
    pub fn is_referenced(&self, id: u32) -> bool {
        self.neighbours(id, Direction::Referrers).iter().any(|&r| r != id)
    }

    /// The ids of every node, in id order.
    pub fn node_ids(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.slots.len() as u32).filter(|&id| self.path(id).is_some())
    }

    /// One past the largest id: the size of a bitset over nodes.
    pub fn id_bound(&self) -> usize {
        self.slots.len()
    }

    pub fn id(&self, path: &StorePath) -> Option<u32> {
        self.ids.get(path).copied()
    }

    pub fn path(&self, id: u32) -> Option<&StorePath> {
        self.node(id).and_then(|n| n.path.as_ref())
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Direct neighbours of a node.
    pub fn neighbours(&self, id: u32, dir: Direction) -> &[u32] {
        match (self.node(id), dir) {
            (Some(n), Direction::References) => &n.refs,
            (Some(n), Direction::Referrers) => &n.referrers,
            (None, _) => &[],
        }
    }

    /// Every node reachable from `start` (included), in topological order with each node after
    /// everything it points to (for [`Direction::References`]: dependencies first, as
    /// `nix-store -qR` prints them).
    pub fn walk(&self, start: &[u32], dir: Direction) -> Vec<u32> {
        let mut seen = vec![false; self.slots.len()];
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

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_nix::{Hash, HashAlgo, StoreDir};

    fn path(n: u32) -> StorePath {
        let name = format!("p{n}");
        StoreDir::default().make_store_path("test", &Hash::digest(HashAlgo::Sha256, name.as_bytes()), &name).unwrap()
    }

    #[test]
    fn churn_reuses_node_places_and_keeps_closures_right() {
        let mut g = Graph::default();
        // A base of 10 paths in a chain that every later path refers to.
        for id in 0..10 {
            g.insert_path(id, &path(id), id.checked_sub(1));
        }
        // 100 rounds of 50 paths added (each referring to the base's top and to the one
        // before it) and then collected, referrers first, as the collector does.
        let mut next = 10;
        for _ in 0..100 {
            let first = next;
            for _ in 0..50 {
                let refs = if next == first { vec![9] } else { vec![9, next - 1] };
                g.insert_path(next, &path(next), refs);
                next += 1;
            }
            assert_eq!(g.walk(&[next - 1], Direction::References).len(), 60);
            for id in (first..next).rev() {
                g.remove_node(id);
            }
            assert_eq!(g.walk(&[0], Direction::Referrers).len(), 10);
        }
        assert_eq!(g.len(), 10);
        assert_eq!(g.id_bound(), next as usize, "row ids are never reused");
        assert!(g.nodes.len() <= 60, "{} node places for at most 60 live paths", g.nodes.len());
        assert!(!g.is_referenced(9));
        assert_eq!(g.walk(&[9], Direction::References), (0..10).collect::<Vec<_>>());
    }
}
