//! A bounded per-thread free list: values a request would otherwise
//! allocate and free (header maps, head buffers) are given back here and
//! taken again by the thread's next request.

use std::cell::RefCell;

pub struct FreeList<T> {
    items: RefCell<Vec<T>>,
    max: usize,
}

impl<T> FreeList<T> {
    /// A list that keeps at most `max` values.
    pub const fn new(max: usize) -> Self {
        FreeList {
            items: RefCell::new(Vec::new()),
            max,
        }
    }

    /// The value given back last, if any.
    pub fn take(&self) -> Option<T> {
        self.items.borrow_mut().pop()
    }

    /// Keeps `v` for reuse, unless the list is full (then it is dropped).
    pub fn give(&self, v: T) {
        let mut items = self.items.borrow_mut();
        if items.len() < self.max {
            items.push(v);
        }
    }

    pub fn len(&self) -> usize {
        self.items.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::FreeList;

    #[test]
    fn keeps_at_most_its_bound_and_gives_the_last_back_first() {
        let l = FreeList::new(2);
        assert_eq!(l.take(), None::<u8>);
        l.give(1);
        l.give(2);
        l.give(3);
        assert_eq!(l.len(), 2, "the value over the bound is dropped");
        assert_eq!(l.take(), Some(2));
        assert_eq!(l.take(), Some(1));
        assert!(l.is_empty());
    }
}
