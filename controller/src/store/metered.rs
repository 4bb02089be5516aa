//! A [`Store`] decorator that times every operation into the controller's metrics.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use muster_machinery::model::MachineId;
use muster_machinery::token::JoinToken;

use super::{BuildFn, LayerRecord, MachineRecord, Registration, Store, StoreError, TokenRecord, UpdateFn};
use crate::metrics::Metrics;

/// A [`Store`] that times every operation of the store it wraps.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(&self, op: &'static str, f: impl Future<Output = T>) -> T {
        let start = Instant::now();
        let r = f.await;
        self.metrics.store_op(op, start.elapsed().as_secs_f64());
        r
    }
}

#[async_trait]
impl Store for MeteredStore {
    async fn insert_token(&self, token: TokenRecord) -> Result<(), StoreError> {
        self.timed("insert_token", self.inner.insert_token(token)).await
    }
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.timed("list_tokens", self.inner.list_tokens()).await
    }
    async fn update_token(&self, id: &str, f: UpdateFn<TokenRecord>) -> Result<TokenRecord, StoreError> {
        self.timed("update_token", self.inner.update_token(id, f)).await
    }
    async fn enroll(
        &self,
        token: &JoinToken,
        now_ms: i64,
        build: BuildFn,
    ) -> Result<MachineRecord, StoreError> {
        self.timed("enroll", self.inner.enroll(token, now_ms, build)).await
    }
    async fn get_machine(&self, id: &MachineId) -> Result<Option<MachineRecord>, StoreError> {
        self.timed("get_machine", self.inner.get_machine(id)).await
    }
    async fn list_machines(&self) -> Result<Vec<MachineRecord>, StoreError> {
        self.timed("list_machines", self.inner.list_machines()).await
    }
    async fn update_machine(
        &self,
        id: &MachineId,
        f: UpdateFn<MachineRecord>,
    ) -> Result<MachineRecord, StoreError> {
        self.timed("update_machine", self.inner.update_machine(id, f)).await
    }
    async fn delete_machine(&self, id: &MachineId) -> Result<(), StoreError> {
        self.timed("delete_machine", self.inner.delete_machine(id)).await
    }
    async fn record_last_seen(&self, seen: Vec<(MachineId, i64)>) -> Result<(), StoreError> {
        self.timed("record_last_seen", self.inner.record_last_seen(seen)).await
    }
    async fn get_layer(&self, key: &str) -> Result<Option<LayerRecord>, StoreError> {
        self.timed("get_layer", self.inner.get_layer(key)).await
    }
    async fn put_layer(
        &self,
        key: &str,
        layer: Option<serde_json::Value>,
        now_ms: i64,
    ) -> Result<LayerRecord, StoreError> {
        self.timed("put_layer", self.inner.put_layer(key, layer, now_ms)).await
    }
    async fn list_layers(&self) -> Result<Vec<(String, LayerRecord)>, StoreError> {
        self.timed("list_layers", self.inner.list_layers()).await
    }
    async fn update_machine_with_registrations(
        &self,
        id: &MachineId,
        f: super::ClaimFn,
    ) -> Result<MachineRecord, StoreError> {
        self.timed("update_machine_with_registrations", self.inner.update_machine_with_registrations(id, f))
            .await
    }
    async fn put_registration(&self, r: Registration) -> Result<(), StoreError> {
        self.timed("put_registration", self.inner.put_registration(r)).await
    }
    async fn list_registrations(&self) -> Result<Vec<Registration>, StoreError> {
        self.timed("list_registrations", self.inner.list_registrations()).await
    }
    async fn delete_registration(&self, mac: &str) -> Result<bool, StoreError> {
        self.timed("delete_registration", self.inner.delete_registration(mac)).await
    }
}
