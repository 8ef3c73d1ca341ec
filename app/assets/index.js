/*
 * The slide index: filter by name, and per slide, once its row scrolls into view, the facts
 * of /api/slides/{name} (dimensions, vendor, mpp, objective power). Thumbnails are
 * <img loading="lazy">, so hundreds of slides cost only the rows on screen.
 */
(function () {
  'use strict';

  var base = document.body.getAttribute('data-base') || '';
  var headers = { Accept: 'application/json' };
  try {  // the bearer token a viewer page of this tab was handed, if any
    var token = window.sessionStorage.getItem('tileserver.token');
    if (token) {
      headers.Authorization = 'Bearer ' + token;
    }
  } catch (e) { /* no session storage: no token */ }
  var list = document.getElementById('slides');
  var filter = document.getElementById('filter');
  var shown = document.getElementById('shown');
  var rows = Array.prototype.slice.call(list.querySelectorAll('li[data-name]'));
  var numberFormat = new Intl.NumberFormat('en-US');

  function applyFilter() {
    var text = filter.value.trim().toLowerCase();
    var count = 0;
    rows.forEach(function (row) {
      var match = !text || row.getAttribute('data-name').toLowerCase().indexOf(text) !== -1;
      row.hidden = !match;
      count += match ? 1 : 0;
    });
    shown.textContent = count + (count === rows.length ? '' : ' of ' + rows.length) + ' slides';
  }
  filter.addEventListener('input', applyFilter);

  function describe(row, info) {
    var facts = [];
    if (info.dimensions) {
      facts.push(numberFormat.format(info.dimensions[0]) + ' \u00d7 ' +
        numberFormat.format(info.dimensions[1]) + ' px');
    }
    if (info.vendor) {
      facts.push(info.vendor);
    }
    if (info.mpp && info.mpp[0]) {
      facts.push(Number(info.mpp[0]).toFixed(3) + ' \u00b5m/px');
    }
    var power = info.properties && info.properties['openslide.objective-power'];
    if (power) {
      facts.push(power + '\u00d7');
    }
    row.querySelector('.facts').textContent = facts.join(' \u00b7 ');
  }

  function load(row) {
    var name = row.getAttribute('data-name');
    fetch(base + '/api/slides/' + encodeURIComponent(name), { headers: headers })
      .then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) {
            throw new Error(body.detail || ('HTTP ' + response.status));
          }
          return body;
        });
      })
      .then(function (info) { describe(row, info); })
      .catch(function (err) {
        row.querySelector('.facts').textContent = 'cannot be opened: ' + err.message;
        row.classList.add('broken');
      });
  }

  if ('IntersectionObserver' in window) {
    var observer = new IntersectionObserver(function (entries) {
      entries.forEach(function (entry) {
        if (entry.isIntersecting) {
          observer.unobserve(entry.target);
          load(entry.target);
        }
      });
    }, { rootMargin: '200px' });
    rows.forEach(function (row) { observer.observe(row); });
  } else {
    rows.forEach(load);
  }
  applyFilter();
})();
