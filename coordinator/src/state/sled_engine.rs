//! The embedded engine: one sled database in the data directory, one sled
//! tree per [`Tree`]. It is the default and what a single coordinator uses;
//! it never talks to the network.

use std::path::Path;

use futures::future::BoxFuture;

use super::{KeyRange, Order, StateEngine, StateError, Tree};

/// The sled database.
#[derive(Clone)]
pub struct SledEngine {
    db: sled::Db,
    trees: [sled::Tree; 6],
}

impl std::fmt::Debug for SledEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledEngine").finish_non_exhaustive()
    }
}

fn sled_error(action: impl Into<String>) -> impl FnOnce(sled::Error) -> StateError {
    let action = action.into();
    move |source| StateError::Sled { action, source }
}

fn printable(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

impl SledEngine {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let open_error = |source| StateError::Open {
            path: dir.to_owned(),
            source,
        };
        let db = sled::Config::new().path(dir).open().map_err(open_error)?;
        let tree = |tree: Tree| db.open_tree(tree.name()).map_err(open_error);
        Ok(Self {
            trees: [
                tree(Tree::Nodes)?,
                tree(Tree::Jobs)?,
                tree(Tree::Runs)?,
                tree(Tree::Events)?,
                tree(Tree::Catalog)?,
                tree(Tree::Tokens)?,
            ],
            db,
        })
    }

    fn tree(&self, tree: Tree) -> &sled::Tree {
        let index = Tree::ALL
            .iter()
            .position(|known| *known == tree)
            .unwrap_or_default();
        &self.trees[index]
    }
}

impl StateEngine for SledEngine {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.tree(tree)
            .get(key)
            .map(|value| value.map(|value| value.to_vec()))
            .map_err(sled_error(format!(
                "read {}/{}",
                tree.name(),
                printable(key)
            )))
    }

    fn insert(&self, tree: Tree, key: &[u8], value: Vec<u8>) -> Result<(), StateError> {
        self.tree(tree)
            .insert(key, value)
            .map(|_| ())
            .map_err(sled_error(format!(
                "store {}/{}",
                tree.name(),
                printable(key)
            )))
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.tree(tree)
            .remove(key)
            .map(|value| value.map(|value| value.to_vec()))
            .map_err(sled_error(format!(
                "remove {}/{}",
                tree.name(),
                printable(key)
            )))
    }

    fn scan(
        &self,
        tree: Tree,
        range: &KeyRange,
        order: Order,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StateError> {
        let Some(bounds) = range.bounds() else {
            return Ok(());
        };
        let entries = self.tree(tree).range::<&[u8], _>(bounds);
        let mut entries: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            match order {
                Order::Ascending => Box::new(entries),
                Order::Descending => Box::new(entries.rev()),
            };
        for entry in &mut entries {
            let (key, value) = entry.map_err(sled_error(format!("read {}", tree.name())))?;
            if !visit(&key, &value) {
                break;
            }
        }
        Ok(())
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async move {
            self.db
                .flush_async()
                .await
                .map(|_| ())
                .map_err(sled_error("flush"))
        })
    }
}
