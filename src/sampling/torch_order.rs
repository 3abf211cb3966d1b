//! The order in which PyTorch's CPU `torch.sort(descending=True)` leaves equal values.
//!
//! The original's top-p filter keeps a prefix of the row sorted by logit. When the cut falls
//! inside a run of equal logits (common with fp16 weights), which of the equal tokens survive
//! depends on where the sort put them. PyTorch 2.4 sorts float rows on the CPU with libstdc++'s
//! `std::sort` (introsort: median-of-three quicksort down to runs of 16, heapsort past a depth of
//! 2·⌊log₂ n⌋, then one insertion sort) over (value, index) pairs compared by value alone, NaN
//! first. That algorithm is not stable, so the order of equal values is whatever its swaps leave;
//! this file repeats those swaps step for step.

/// The indices of `row` in the order `torch.sort(row, descending=True)` returns them on the CPU.
pub fn descending_order(row: &[f32]) -> Vec<usize> {
    let mut items: Vec<(f32, usize)> = row.iter().copied().zip(0..).collect();
    let n = items.len();
    if n > 0 {
        let depth = 2 * n.ilog2() as usize;
        introsort_loop(&mut items, depth);
        final_insertion_sort(&mut items);
    }
    items.into_iter().map(|(_, i)| i).collect()
}

/// PyTorch's `KeyValueCompDesc`: does `a` come strictly before `b`?
fn before(a: &(f32, usize), b: &(f32, usize)) -> bool {
    (a.0.is_nan() && !b.0.is_nan()) || a.0 > b.0
}

/// Runs this short are left for the final insertion sort.
const THRESHOLD: usize = 16;

fn introsort_loop(v: &mut [(f32, usize)], mut depth: usize) {
    let mut last = v.len();
    while last > THRESHOLD {
        if depth == 0 {
            heap_sort(&mut v[..last]);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(&mut v[..last]);
        introsort_loop(&mut v[cut..last], depth);
        last = cut;
    }
}

/// Moves the median of v[1], v[mid], v[last] to v[0] and partitions the rest around it.
fn partition_pivot(v: &mut [(f32, usize)]) -> usize {
    let (a, b, c) = (1, v.len() / 2, v.len() - 1);
    let median = if before(&v[a], &v[b]) {
        if before(&v[b], &v[c]) {
            b
        } else if before(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if before(&v[a], &v[c]) {
        a
    } else if before(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(0, median);
    // Hoare's unguarded partition: the pivot at v[0] and the median-of-three bound both scans.
    let (mut lo, mut hi) = (1, v.len());
    loop {
        while before(&v[lo], &v[0]) {
            lo += 1;
        }
        hi -= 1;
        while before(&v[0], &v[hi]) {
            hi -= 1;
        }
        if lo >= hi {
            return lo;
        }
        v.swap(lo, hi);
        lo += 1;
    }
}

/// Shifts v[i] left past every element it comes before; something before it must stop the scan.
fn unguarded_linear_insert(v: &mut [(f32, usize)], mut i: usize) {
    let val = v[i];
    while before(&val, &v[i - 1]) {
        v[i] = v[i - 1];
        i -= 1;
    }
    v[i] = val;
}

fn insertion_sort(v: &mut [(f32, usize)]) {
    for i in 1..v.len() {
        if before(&v[i], &v[0]) {
            v[..=i].rotate_right(1);
        } else {
            unguarded_linear_insert(v, i);
        }
    }
}

fn final_insertion_sort(v: &mut [(f32, usize)]) {
    if v.len() > THRESHOLD {
        insertion_sort(&mut v[..THRESHOLD]);
        for i in THRESHOLD..v.len() {
            unguarded_linear_insert(v, i);
        }
    } else {
        insertion_sort(v);
    }
}

/// `std::make_heap` then `std::sort_heap`, as `std::partial_sort(first, last, last)` runs them.
fn heap_sort(v: &mut [(f32, usize)]) {
    let n = v.len();
    if n >= 2 {
        let mut parent = (n - 2) / 2;
        loop {
            let value = v[parent];
            adjust_heap(v, parent, n, value);
            if parent == 0 {
                break;
            }
            parent -= 1;
        }
    }
    let mut last = n;
    while last > 1 {
        last -= 1;
        let value = v[last];
        v[last] = v[0];
        adjust_heap(v, 0, last, value);
    }
}

fn adjust_heap(v: &mut [(f32, usize)], mut hole: usize, len: usize, value: (f32, usize)) {
    let top = hole;
    let mut child = hole;
    while child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if before(&v[child], &v[child - 1]) {
            child -= 1;
        }
        v[hole] = v[child];
        hole = child;
    }
    if len.is_multiple_of(2) && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        v[hole] = v[child - 1];
        hole = child - 1;
    }
    // push_heap back up from the hole
    while hole > top {
        let parent = (hole - 1) / 2;
        if !before(&v[parent], &value) {
            break;
        }
        v[hole] = v[parent];
        hole = parent;
    }
    v[hole] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_is_descending_and_a_permutation() {
        let row: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 13) as f32).collect();
        let order = descending_order(&row);
        let mut seen = order.clone();
        seen.sort();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        assert!(order.windows(2).all(|w| row[w[0]] >= row[w[1]]));
    }

    #[test]
    fn short_rows_keep_equal_values_in_index_order() {
        // Up to 16 values only the insertion sort runs, which is stable.
        let row = [1.0, 2.0, 1.0, 2.0, 1.0];
        assert_eq!(descending_order(&row), [1, 3, 0, 2, 4]);
    }

    #[test]
    fn the_heap_sort_fallback_sorts() {
        let mut v: Vec<(f32, usize)> = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
            .iter()
            .copied()
            .zip(0..)
            .collect();
        heap_sort(&mut v);
        assert!(v.windows(2).all(|w| w[0].0 >= w[1].0));
    }
}
