//! Numbers handed out to keys and taken back: identities and rule ids.

use super::*;

/// Hands out numbers to keys, keeping the number of a key for as long as something holds it. Freed
/// numbers are reused oldest-first, and never within the update that freed them, so that a number
/// means something else as late as possible (flows in flight and conntrack entries carry numbers).
#[derive(Debug)]
pub(super) struct Allocator<K: Ord> {
    /// Key → (number, holders).
    pub(super) ids: BTreeMap<K, (u32, usize)>,
    free: VecDeque<u32>,
    /// Freed during the current update; reusable after [`Allocator::finish`].
    freed: Vec<u32>,
    next: u32,
}

impl<K: Ord + Clone> Allocator<K> {
    pub(super) fn new(first: u32) -> Self {
        Self {
            ids: BTreeMap::new(),
            free: VecDeque::new(),
            freed: Vec::new(),
            next: first,
        }
    }

    /// One more holder of `k`; its number.
    pub(super) fn acquire(&mut self, k: &K) -> u32 {
        if let Some((id, n)) = self.ids.get_mut(k) {
            *n += 1;
            return *id;
        }
        let id = self.free.pop_front().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        self.ids.insert(k.clone(), (id, 1));
        id
    }

    /// One holder less; the number when it was the last one.
    pub(super) fn release<Q>(&mut self, k: &Q) -> Option<u32>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let (id, n) = self.ids.get_mut(k)?;
        *n -= 1;
        if *n > 0 {
            return None;
        }
        let id = *id;
        self.ids.remove(k);
        self.freed.push(id);
        Some(id)
    }

    pub(super) fn get<Q>(&self, k: &Q) -> Option<u32>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.ids.get(k).map(|(id, _)| *id)
    }

    /// Before a rebuild: every key loses its holders but keeps its number until [`Allocator::sweep`].
    pub(super) fn forget_holders(&mut self) {
        for (_, n) in self.ids.values_mut() {
            *n = 0;
        }
    }

    /// After a rebuild: frees the keys nobody holds again.
    pub(super) fn sweep(&mut self) {
        let freed = &mut self.freed;
        self.ids.retain(|_, (id, n)| {
            if *n == 0 {
                freed.push(*id);
            }
            *n > 0
        });
    }

    /// End of an update: what it freed becomes reusable, after what was freed earlier.
    pub(super) fn finish(&mut self) {
        self.freed.sort_unstable();
        self.free.extend(self.freed.drain(..));
    }
}
